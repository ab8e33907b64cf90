//! policy-agent: the node agent's library — manifest loading, the offline commands
//! (`matrix`, `explain`, `compile`) and their renderings.

pub mod agent;
pub mod cli;
pub mod crd;
pub mod datapath;
pub mod describe;
pub mod explain;
pub mod flows;
pub mod manifests;
pub mod matrix;
pub mod node_port;
pub mod tables_view;
pub mod text;
