//! Kiln as a fleet: the container image `scripts/image.sh` builds, run the way an operator runs
//! it: alone, from OCI registries, as replicas in cluster mode, as a Swarm service and a Compose
//! project scaled on its own metrics, and as the Kubernetes objects of `deploy/kubernetes`. The
//! tests that need a Docker daemon (or kubectl, or Prometheus) are counted as skipped
//! (`kiln_tests::skip`), not passed, where it is missing.

mod docker;
mod image;
mod registry;
mod cluster;
mod swarm;
mod autoscale;
mod kubernetes;
