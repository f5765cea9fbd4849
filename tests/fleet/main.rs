//! Kiln as a fleet: the container image `scripts/image.sh` builds, run the way an operator runs
//! it. These tests need a Docker daemon; where there is none they are counted as skipped
//! (`kiln_tests::skip`), not passed.

mod docker;
mod image;
mod registry;
mod cluster;
mod swarm;
