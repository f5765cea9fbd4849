//! `kiln push` and `kiln pull`: handlers to and from OCI registries (`deploy::oci`).

use std::path::PathBuf;

use anyhow::Context as _;
use kiln_codec::oci::OciRef;

use crate::deploy::oci::{self, Access};

/// How to reach the registry: the same files `[server] registry_auth` and `registry_ca` name.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryFlags {
    /// Registry credentials: a Docker config.json (default: $DOCKER_CONFIG/config.json, else
    /// ~/.docker/config.json, where there is one).
    #[arg(long, env = "KILN_REGISTRY_AUTH")]
    pub registry_auth: Option<PathBuf>,
    /// CA certificates (PEM) to trust for the registry besides the public roots built into kiln (Mozilla's, from webpki-roots).
    #[arg(long, env = "KILN_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,
}

impl RegistryFlags {
    fn access(&self) -> anyhow::Result<Access> {
        Access::load(self.registry_auth.as_deref(), self.registry_ca.as_deref())
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The component (.wasm).
    pub component: PathBuf,
    /// Where to push it: oci://REGISTRY/REPOSITORY:TAG.
    pub to: String,
    /// A signature to attach (the .sig file `kiln sign` wrote), for tenants with a signing key.
    #[arg(long)]
    pub signature: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// oci://REGISTRY/REPOSITORY@sha256:DIGEST, or :TAG.
    pub from: String,
    /// Where to write the component (default: REPOSITORY's last part + .wasm).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Pushes, then prints the pinned reference to put in a config.
pub fn push(args: &PushArgs) -> anyhow::Result<()> {
    let to = OciRef::parse(&args.to)?;
    let component = std::fs::read(&args.component).with_context(|| format!("cannot read {}", args.component.display()))?;
    let signature = match &args.signature {
        Some(file) => Some(std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?),
        None => None,
    };
    if let Some(sig) = &signature
        && crate::tenancy::keys::decode_base64(sig).is_none_or(|s| s.len() != 64)
    {
        anyhow::bail!("{}: not a signature from `kiln sign` (base64 of 64 bytes)", args.signature.as_ref().map_or(String::new(), |p| p.display().to_string()));
    }
    let access = args.registry.access()?;
    let digest = runtime()?.block_on(oci::push(&access, component, &to, signature.as_deref()))?;
    println!("{}", to.at(&digest));
    Ok(())
}

/// Pulls and verifies, writes the component, and prints its pinned reference.
pub fn pull(args: &PullArgs) -> anyhow::Result<()> {
    let from = OciRef::parse(&args.from)?;
    let access = args.registry.access()?;
    let pulled = runtime()?.block_on(oci::pull(&access, &from))?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("{}.wasm", from.repository.rsplit('/').next().unwrap_or("handler")))
    });
    crate::files::write_atomic(&out, &pulled.component).with_context(|| format!("cannot write {}", out.display()))?;
    let signed = if pulled.manifest.signature.is_some() { ", signed" } else { "" };
    eprintln!("wrote {} ({} bytes{signed})", out.display(), pulled.component.len());
    println!("{}", from.at(&pulled.digest));
    Ok(())
}
