//! The audit log: one line for every deploy, delete, auth failure and quota refusal.
//!
//! Lines go to the server log (target `kiln::audit`) and, as JSON, to `audit.log` in the state
//! directory. They name the tenant, the handler and the reason; never a key or a request body.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Deploy,
    DeployRefused,
    Delete,
    AuthFailure,
    QuotaRefused,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Deploy => "deploy",
            Event::DeployRefused => "deploy_refused",
            Event::Delete => "delete",
            Event::AuthFailure => "auth_failure",
            Event::QuotaRefused => "quota_refused",
        }
    }
}

#[derive(Debug)]
pub struct Audit {
    file: Option<Mutex<File>>,
}

impl Audit {
    /// Appends to `state_dir/audit.log`; if it cannot be opened, lines go to the server log only.
    pub fn open(state_dir: &Path) -> Audit {
        let path = state_dir.join("audit.log");
        let file = OpenOptions::new().create(true).append(true).open(&path);
        match file {
            Ok(f) => Audit {
                file: Some(Mutex::new(f)),
            },
            Err(e) => {
                tracing::error!("cannot open the audit log {}: {e}; auditing to the server log only", path.display());
                Audit { file: None }
            }
        }
    }

    /// Records one event.
    pub fn record(&self, event: Event, tenant: Option<&str>, handler: Option<&str>, reason: &str) {
        tracing::info!(
            target: "kiln::audit",
            event = %event.as_str(),
            tenant = %tenant.unwrap_or("-"),
            handler = %handler.unwrap_or("-"),
            "{reason}"
        );
        let Some(file) = &self.file else { return };
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let line = json!({
            "time": (time * 1000.0).round() / 1000.0,
            "event": event.as_str(),
            "tenant": tenant,
            "handler": handler,
            "reason": reason,
        });
        if let Ok(mut f) = file.lock()
            && let Err(e) = writeln!(f, "{line}") {
                tracing::error!("cannot write the audit log: {e}");
            }
    }
}
