//! Reads the kernel's flow events ring buffer (`PA_FLOWS`, pinned with the maps) as
//! events arrive, names them and hands them on.

use std::path::Path;
use std::time::Duration;

use aya::maps::{Map, MapData, RingBuf};
use policy_ebpf::FlowEvent;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::log::FlowLog;
use super::names::{monotonic_ns, realtime_ns};
use super::{Flow, FlowError, Flows};

/// Opens the ring buffer pinned at `pin`.
pub fn open(pin: &Path) -> Result<RingBuf<MapData>, FlowError> {
    let err = |message: String| FlowError::Open { path: pin.to_path_buf(), message };
    let data = MapData::from_pin(pin).map_err(|e| err(e.to_string()))?;
    RingBuf::try_from(Map::RingBuf(data)).map_err(|e| err(e.to_string()))
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: at least size_of::<FlowEvent>() bytes are readable at `bytes`; FlowEvent is
    // plain integers (`#[repr(C)]`, no padding, valid for any bit pattern), read unaligned.
    Some(unsafe { bytes.as_ptr().cast::<FlowEvent>().read_unaligned() })
}

/// Reads events until the process ends: each batch is named (with the state of
/// `flows.names`), written to `log`, published to `flows.hub` and passed to `on_batch`
/// (metrics).
pub async fn run(
    ring: RingBuf<MapData>,
    flows: Flows,
    mut log: Option<FlowLog>,
    mut on_batch: impl FnMut(&[Flow]) + Send,
) -> Result<(), FlowError> {
    // SAFETY: the ring buffer owns its map's file descriptor, which stays open and is
    // never replaced while the `AsyncFd` holds it (it is dropped with it).
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| FlowError::Io(e.into_parts().1))?;
    let mut events = Vec::new();
    loop {
        // Readiness is edge-triggered: an event submitted between the last read and
        // `clear_ready` would wait for the next one, so the ring is drained every 200 ms too.
        match tokio::time::timeout(Duration::from_millis(200), fd.readable_mut()).await {
            Ok(Ok(mut guard)) => {
                drain(guard.get_inner_mut(), &mut events);
                guard.clear_ready();
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
        drain(fd.get_mut(), &mut events);
        if events.is_empty() {
            continue;
        }
        let offset = realtime_ns().wrapping_sub(monotonic_ns());
        let batch: Vec<Flow> = {
            let names = flows.names.lock().unwrap_or_else(|p| p.into_inner());
            events.iter().map(|e| names.name(e, offset)).collect()
        };
        events.clear();
        if let Some(l) = log.as_mut() {
            if let Err(e) = l.write(&batch) {
                warn!(error = %e, "cannot write the flow log");
            }
        }
        on_batch(&batch);
        for f in batch {
            flows.hub.publish(f);
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<FlowEvent>) {
    while let Some(item) = ring.next() {
        if let Some(e) = decode(&item) {
            out.push(e);
        }
    }
}
