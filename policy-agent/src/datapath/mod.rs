//! The datapath from user space: load the kernel programs once, pin them and their maps
//! under `/sys/fs/bpf/policy-agent/` (maps in a directory per layout, sizes and generation:
//! see `migrate`), attach them to interfaces, and keep the maps equal
//! to the compiler's tables.

mod encode;
mod enforcer;
mod loader;
pub mod migrate;
mod model;
mod sync;

pub use encode::{Allow, PeerSlot, PortEntry, encode_addr, peer_entries, port_entries_allow, port_set_entries};
pub use enforcer::{DatapathStatus, Enforcer, FLOW_EVENTS_ENV, PAUSE_BEFORE_SWAP_ENV, PAUSE_BETWEEN_SWAPS_ENV, PodInterface};
pub use loader::{AttachPoint, DEFAULT_FLOW_RATE, Datapath, DatapathError, FlowConfig, MapSizes, PIN_ROOT};
pub use migrate::maps_dir_in_force;
pub use model::ModelMaps;
pub use sync::{Budget, EndpointStatus, MapSync, Maps, SyncError, SyncErrorKind, SyncReport, WriteError, decode_addr};

/// The compiled kernel programs (ELF), built by `build.rs`.
pub fn program_bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf"))
}
