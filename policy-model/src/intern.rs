//! Shared strings for what many objects repeat: label keys and values, namespace names.
//!
//! 10,000 pods carry perhaps 30 distinct label strings; holding each once keeps the
//! agent's memory per pod small. Strings nobody holds any more are dropped once the set
//! has doubled since the last sweep (amortised O(1) per call), so values that come and go
//! (`pod-template-hash`) do not accumulate.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

struct Interner {
    strings: HashSet<Arc<str>>,
    /// Sweep when the set reaches this size.
    sweep_at: usize,
}

static INTERNER: Mutex<Option<Interner>> = Mutex::new(None);

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    let mut guard = INTERNER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let i = guard.get_or_insert_with(|| Interner { strings: HashSet::new(), sweep_at: 1024 });
    if let Some(found) = i.strings.get(s) {
        return found.clone();
    }
    if i.strings.len() >= i.sweep_at {
        i.strings.retain(|a| Arc::strong_count(a) > 1);
        i.sweep_at = (i.strings.len() * 2).max(1024);
    }
    let a: Arc<str> = Arc::from(s);
    i.strings.insert(a.clone());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation_and_unused_ones_go() {
        let a = intern("app");
        let b = intern(&String::from("app"));
        assert!(Arc::ptr_eq(&a, &b));
        // Unheld strings are swept once the set doubles: it stays bounded.
        for n in 0..100_000 {
            let _ = intern(&format!("pod-template-hash-{n}"));
        }
        let len = INTERNER.lock().unwrap().as_ref().unwrap().strings.len();
        assert!(len < 4096, "{len} strings kept");
        assert!(Arc::ptr_eq(&a, &intern("app")), "held strings stay");
    }
}
