//! Shared copies of what many objects repeat: label keys and values, namespace names, the
//! provenance lists of table entries.
//!
//! 10,000 pods carry perhaps 30 distinct label strings, and every local pod's table names
//! the same peer pods; holding each once keeps the agent's memory per pod small. Values
//! nobody holds any more are dropped once the set has doubled since the last sweep
//! (amortised O(1) per call), so values that come and go (`pod-template-hash`, deleted
//! pods) do not accumulate.

use std::collections::HashSet;

use foldhash::fast::RandomState;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// The shared slices, and the size at which to sweep them.
type Slices<T> = (HashSet<Arc<[T]>, RandomState>, usize);

/// A set of shared slices of one type (see the module docs).
pub struct Interner<T: 'static> {
    set: Mutex<Option<Slices<T>>>,
}

impl<T: Hash + Eq + Clone + 'static> Interner<T> {
    pub const fn new() -> Interner<T> {
        Interner { set: Mutex::new(None) }
    }

    /// The shared copy of `items`.
    pub fn get(&self, items: &[T]) -> Arc<[T]> {
        let mut guard = self.set.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (set, sweep_at) = guard.get_or_insert_with(|| (HashSet::default(), 1024));
        if let Some(found) = set.get(items) {
            return found.clone();
        }
        if set.len() >= *sweep_at {
            set.retain(|a| Arc::strong_count(a) > 1);
            *sweep_at = (set.len() * 2).max(1024);
        }
        let a: Arc<[T]> = Arc::from(items);
        set.insert(a.clone());
        a
    }
}

impl<T: Hash + Eq + Clone + 'static> Default for Interner<T> {
    fn default() -> Interner<T> {
        Interner::new()
    }
}

struct StringSet {
    strings: HashSet<Arc<str>, RandomState>,
    /// Sweep when the set reaches this size.
    sweep_at: usize,
}

static INTERNER: Mutex<Option<StringSet>> = Mutex::new(None);

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    let mut guard = INTERNER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let i = guard.get_or_insert_with(|| StringSet { strings: HashSet::default(), sweep_at: 1024 });
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
