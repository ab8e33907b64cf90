//! conformance: the upstream NetworkPolicy e2e cases as data, and the runners that check
//! them. The model-level runner judges a case with the project's model through the same
//! path as `policy-agent matrix`; the expectations in `cases/` are written from the
//! upstream tests, never computed.

pub mod agent_process;
pub mod apiserver;
pub mod bench_rules;
pub mod case;
pub mod cluster;
pub mod fuzz;
pub mod model;
pub mod netns;
pub mod programs;
pub mod rig;
pub mod runner;
pub mod service;
pub mod topology;
pub mod traffic;
