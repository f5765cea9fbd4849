//! Certificates the TLS tests make (rcgen): certificate authorities of their own, server
//! certificates for loopback, client certificates, and expired ones.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A certificate authority of the test's own.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM text.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Pair {
    /// Writes both into `dir` as `NAME.pem` and `NAME.key` (each replaced at once, as a
    /// certificate manager does); their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        replace(&key, &self.key);
        replace(&cert, &self.cert);
        (cert, key)
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA");
        Ca { cert, key }
    }

    /// A server certificate for 127.0.0.1 and localhost signed by this CA.
    pub fn leaf(&self) -> Pair {
        self.sign(CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("params"))
    }

    /// [`Ca::leaf`], but one that expired in 2021.
    pub fn expired_leaf(&self) -> Pair {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.sign(params)
    }

    /// A client certificate named `name`.
    pub fn client(&self, name: &str) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("signed");
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// This CA's certificate (PEM).
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes [`Ca::pem`] to `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        replace(path, &self.pem());
        path.to_owned()
    }

    pub fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.cert.pem().as_bytes()).expect("root")
    }
}

/// Writes `pem` to `path` at once (a new file renamed over the old).
pub fn replace(path: &Path, pem: &str) {
    let temp = path.with_extension("new");
    std::fs::write(&temp, pem).expect("write");
    std::fs::rename(&temp, path).expect("rename");
}

/// A client that trusts `cas` only (not the system's roots), a new connection per request
/// unless `keep_alive`.
pub fn client(cas: &[&Ca], keep_alive: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).timeout(std::time::Duration::from_secs(20));
    for ca in cas {
        builder = builder.add_root_certificate(ca.root());
    }
    if !keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().expect("client")
}
