//! What an operator does to a model being served, short of replacing it: pause and resume it,
//! flush its queue, reset its statistics, tune its batching and replicas.

use super::*;

/// What an operator does to a model being served (`ModelRepository::control`).
#[derive(Debug, Clone, Copy)]
pub enum Control {
    Pause,
    Resume,
    /// Answer every queued request 503 `flushed`.
    Flush,
    ResetStats,
    Tune(TuningChange),
}

impl ModelRepository {
    /// Applies `control` to the model served as `name`, audited; returns what it did, in words.
    /// Tuning's replica bounds start or drain replicas to fit before it returns. Lasts until the
    /// model is reloaded.
    pub async fn control(&self, name: &str, control: Control) -> Result<String, ModelError> {
        let handle = self.table.get(name).ok_or_else(|| match self.records().contains_key(name) {
            true => ModelError::Invalid(format!("model '{name}' is not being served (load it first)")),
            false => ModelError::NotFound(name.to_owned()),
        })?;
        let done = match control {
            Control::Pause => {
                handle.pause();
                "paused".to_owned()
            }
            Control::Resume => {
                handle.resume();
                "resumed".to_owned()
            }
            Control::Flush => format!("flushed {} queued requests", handle.flush()),
            Control::ResetStats => {
                handle.reset_stats();
                "statistics reset".to_owned()
            }
            Control::Tune(change) => {
                let tuning = handle.tune(change).map_err(|e| ModelError::Invalid(e.to_string()))?;
                let placer = self.placer.clone();
                let fitted = handle.clone();
                let target = tokio::task::spawn_blocking(move || crate::fleet::fit_replicas(&fitted, &placer))
                    .await
                    .map_err(|e| ModelError::Store(format!("the replica task failed: {e}")))?
                    .map_err(ModelError::Invalid)?;
                format!(
                    "tuned: max_batch_size {}, max_queue_delay_us {}, timeout_ms {}, instances {}..={} ({target} now)",
                    tuning.max_batch_size,
                    tuning.max_queue_delay.as_micros(),
                    tuning.timeout.as_millis(),
                    tuning.replicas.min,
                    tuning.replicas.max
                )
            }
        };
        tracing::info!(model = %name, "{done}");
        self.audit.record(Event::ModelControl, None, None, &format!("model '{name}' {done}"));
        self.events.emit(EventKind::ModelChanged { model: name.to_owned(), change: "controlled".into(), detail: done.clone() });
        Ok(done)
    }
}
