//! The walk that turns one endpoint's tiers into LPM entries.
//!
//! Every rule of every tier is a *layer* of grants (address set × ports), in evaluation
//! order: the exemption (own address; the own node's is added after, see
//! `crate::compile::mark_own_node`), the Admin rules, the NetworkPolicy tier,
//! the Baseline rules. The prefixes bounding a grant, walked in sorted order, are a
//! pre-order walk of the prefix tree, as in `crate::compile`; the grants covering a tree
//! node cover every address for which it is the longest match, so evaluating the layers
//! there, port range by port range, gives that region's exact decision. `0.0.0.0/0` and
//! `::/0` are always in the tree, so the tiers' defaults (default allow) become entries
//! too.
//!
//! Two sources feed the walk: the merged grants of the cached rules ([`Merged`], shared by
//! the endpoints with the same rules), and the endpoint's own grants ([`LocalGrant`]).
//! Regions that decide alike are evaluated once ([`Region`]).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use foldhash::HashMap;

use super::cache::Merged;
use super::model::Action;
use crate::ip::{Family, Prefix};
use crate::ports::PortSet;
use crate::table::{Origin, PeerEntry, PortSetId};
use crate::verdict::RuleRef;

pub(super) enum Layer {
    /// Always accepted (the pod's own addresses; ingress from its node).
    Exempt,
    /// One ClusterNetworkPolicy rule.
    Rule { action: Action, rule: RuleRef },
    /// The NetworkPolicy tier: decides everything left when `isolated`.
    NetworkPolicy { isolated: bool },
}

/// A grant of the endpoint's own: its exemptions, its NetworkPolicy grants, and rules that
/// depend on it (ingress named ports). Only these have holes (ipBlock except).
pub(super) struct LocalGrant<'a> {
    pub(super) cidr: Prefix,
    pub(super) except: &'a [Prefix],
    pub(super) ports: &'a PortSet,
    pub(super) origin: &'a Origin,
    pub(super) layer: usize,
    /// NetworkPolicy grants: index into the NetworkPolicy rule list.
    pub(super) np_rule: Option<u32>,
}

/// What one endpoint's table is made of.
pub(super) struct Inputs<'a> {
    pub(super) layers: &'a [Layer],
    pub(super) local: &'a [LocalGrant<'a>],
    pub(super) merged: &'a Merged,
    /// The layer of each rule of `merged`, by its position there.
    pub(super) merged_layers: &'a [usize],
    /// The NetworkPolicy rules `np_rule` indexes.
    pub(super) np_rules: &'a [RuleRef],
}

/// What a region of the tree inherits and decides. Shared (`Rc`) between the regions that
/// `build` finds equal.
struct Region {
    /// Per layer, the union of the plain grants on the path from the root.
    plain: BTreeMap<usize, PortSet>,
    np_rules: Vec<u32>,
    value: PortSet,
    /// The entry this region gets, when its value differs from its parent's.
    entry: Option<(PortSetId, Arc<[RuleRef]>)>,
}

struct Frame {
    prefix: Prefix,
    /// Unique per frame: the key of the regions below it.
    serial: usize,
    region: Rc<Region>,
    /// Local grants with holes covering this prefix.
    blocks: Rc<Vec<usize>>,
}

/// The grants at one prefix.
#[derive(Default)]
struct Here {
    /// The class of the merged item at this prefix.
    class: Option<u32>,
    /// Local grants without holes starting here.
    plain: Vec<usize>,
    /// Local grants with holes starting here.
    blocks: Vec<usize>,
    /// Local grants with a hole here.
    excepts: Vec<usize>,
}

/// The decision of the layers at one region: the allowed traffic and the rules that
/// decided some of it.
pub(super) fn evaluate(
    layers: &[Layer],
    at: &BTreeMap<usize, PortSet>,
    np_rules: &[u32],
    all_np_rules: &[RuleRef],
) -> (PortSet, Vec<RuleRef>) {
    let empty = PortSet::empty();
    let mut remaining = PortSet::all();
    let mut allowed = PortSet::empty();
    let mut passed = PortSet::empty();
    let mut rules = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        match layer {
            Layer::NetworkPolicy { isolated } => {
                // Passed traffic re-enters at the NetworkPolicy tier.
                remaining.union_with(&passed);
                passed = PortSet::empty();
                if *isolated {
                    let hit = remaining.intersect(at.get(&i).unwrap_or(&empty));
                    if !hit.is_empty() {
                        allowed.union_with(&hit);
                        rules.extend(np_rules.iter().map(|r| all_np_rules[*r as usize].clone()));
                    }
                    // A NetworkPolicy that isolates the pod decides everything left.
                    remaining = PortSet::empty();
                }
            }
            Layer::Exempt | Layer::Rule { .. } => {
                let Some(m) = at.get(&i) else { continue };
                let hit = remaining.intersect(m);
                if hit.is_empty() {
                    continue;
                }
                remaining = remaining.subtract(m);
                match layer {
                    Layer::Exempt => allowed.union_with(&hit),
                    Layer::Rule { action, rule } => {
                        match action {
                            Action::Accept => allowed.union_with(&hit),
                            Action::Deny => {}
                            Action::Pass => passed.union_with(&hit),
                        }
                        rules.push(rule.clone());
                    }
                    Layer::NetworkPolicy { .. } => unreachable!(),
                }
            }
        }
    }
    // A Baseline Pass, and anything no tier decided: default allow.
    remaining.union_with(&passed);
    allowed.union_with(&remaining);
    rules.sort();
    rules.dedup();
    (allowed, rules)
}

/// Shared results of one `build`.
#[derive(Default)]
struct Interned {
    port_sets: Vec<PortSet>,
    ids: HashMap<PortSet, PortSetId>,
    rule_lists: HashMap<Vec<RuleRef>, Arc<[RuleRef]>>,
}

impl Interned {
    fn port_set(&mut self, value: &PortSet) -> PortSetId {
        if let Some(id) = self.ids.get(value) {
            return *id;
        }
        self.port_sets.push(value.clone());
        let id = (self.port_sets.len() - 1) as PortSetId;
        self.ids.insert(value.clone(), id);
        id
    }

    fn rules(&mut self, rules: Vec<RuleRef>) -> Arc<[RuleRef]> {
        self.rule_lists.entry(rules).or_insert_with_key(|r| r.as_slice().into()).clone()
    }
}

/// One plain grant's part in deciding a region: layer, ports (by address), NetworkPolicy
/// rule.
type Start = (usize, usize, Option<u32>);

/// Regions computed so far. Two regions decide alike when they have the same parent frame
/// and the same plain grants starting at them: most pod addresses share that with
/// thousands of others, since the same rules match every pod of a namespace. The merged
/// grants are keyed by their class, local ones (rare at a prefix) by their starts.
#[derive(Default)]
struct Memo {
    by_class: HashMap<(usize, u32), Rc<Region>>,
    with_local: HashMap<(usize, u32, Vec<Start>), Rc<Region>>,
}

/// No merged item at a prefix.
const NO_CLASS: u32 = u32::MAX;

/// Where a local grant starts (its prefix) or has a hole (an except).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Mark {
    prefix: Prefix,
    /// Starts sort before holes at one prefix.
    hole: bool,
    grant: u32,
}

/// Root marks: `0.0.0.0/0` and `::/0` are always in the tree.
const ROOT: u32 = u32::MAX;

fn local_marks(local: &[LocalGrant]) -> Vec<Mark> {
    let mut marks: Vec<Mark> = Vec::with_capacity(local.len() + 2);
    for f in [Family::Ipv4, Family::Ipv6] {
        marks.push(Mark { prefix: Prefix::everything(f), hole: false, grant: ROOT });
    }
    for (i, g) in local.iter().enumerate() {
        marks.push(Mark { prefix: g.cidr, hole: false, grant: i as u32 });
        for e in g.except {
            marks.push(Mark { prefix: *e, hole: true, grant: i as u32 });
        }
    }
    marks.sort_unstable();
    marks
}

/// The table's entries and port sets.
pub(super) fn build(inp: &Inputs) -> (Vec<PeerEntry>, Vec<PortSet>) {
    let marks = local_marks(inp.local);
    let items = &inp.merged.items;
    let mut entries = Vec::new();
    let mut interned = Interned::default();
    let mut memo = Memo::default();
    let mut stack: Vec<Frame> = Vec::new();
    let no_blocks: Rc<Vec<usize>> = Rc::default();
    let mut here = Here::default();
    let (mut i, mut j, mut serial) = (0, 0, 0);
    // Both sources are sorted: merging them walks the tree in pre-order (see ip.rs).
    loop {
        let prefix = match (items.get(i), marks.get(j)) {
            (Some(a), Some(b)) => a.prefix.min(b.prefix),
            (Some(a), None) => a.prefix,
            (None, Some(b)) => b.prefix,
            (None, None) => break,
        };
        here.class = None;
        here.plain.clear();
        here.blocks.clear();
        here.excepts.clear();
        let mut item = None;
        if items.get(i).is_some_and(|a| a.prefix == prefix) {
            item = Some(&items[i]);
            here.class = Some(items[i].class);
            i += 1;
        }
        while let Some(m) = marks.get(j).filter(|m| m.prefix == prefix) {
            j += 1;
            let g = m.grant as usize;
            if m.grant == ROOT {
                continue;
            }
            if m.hole {
                here.excepts.push(g);
            } else if inp.local[g].except.is_empty() {
                here.plain.push(g);
            } else {
                here.blocks.push(g);
            }
        }
        while stack.last().is_some_and(|f| !f.prefix.contains(&prefix)) {
            stack.pop();
        }
        let parent = stack.last();
        let (region, blocks) = region_at(inp, &here, parent, &no_blocks, &mut memo, &mut interned);
        if let Some((port_set, rules)) = &region.entry {
            let stands_for = stands_for(inp, &here, item.map(|m| &m.origins), &prefix);
            entries.push(PeerEntry { prefix, port_set: *port_set, stands_for, rules: rules.clone(), own_node: false });
        }
        stack.push(Frame { prefix, serial, region, blocks });
        serial += 1;
    }
    entries.shrink_to_fit();
    let mut port_sets = interned.port_sets;
    port_sets.shrink_to_fit();
    (entries, port_sets)
}

/// The region at one prefix, from the memo when an equal one was evaluated, and the local
/// grants with holes that cover it.
fn region_at(
    inp: &Inputs,
    here: &Here,
    parent: Option<&Frame>,
    no_blocks: &Rc<Vec<usize>>,
    memo: &mut Memo,
    interned: &mut Interned,
) -> (Rc<Region>, Rc<Vec<usize>>) {
    let parent_blocks = parent.map(|f| &f.blocks).unwrap_or(no_blocks);
    let parent_serial = parent.map_or(usize::MAX, |f| f.serial);
    let class = here.class.unwrap_or(NO_CLASS);
    // Grants with holes, and the holes, change the blocks: such regions are rare
    // (NetworkPolicy ipBlocks) and evaluated alone.
    if !here.excepts.is_empty() || !here.blocks.is_empty() {
        let mut blocks: Vec<usize> = parent_blocks.to_vec();
        blocks.extend(here.blocks.iter().copied());
        blocks.retain(|b| !here.excepts.contains(b));
        let r = Rc::new(region(inp, here, parent, &blocks, interned));
        return (r, Rc::new(blocks));
    }
    let region = if here.plain.is_empty() {
        match memo.by_class.get(&(parent_serial, class)) {
            Some(r) => r.clone(),
            None => {
                let r = Rc::new(region(inp, here, parent, parent_blocks, interned));
                memo.by_class.insert((parent_serial, class), r.clone());
                r
            }
        }
    } else {
        let mut starts: Vec<Start> = here
            .plain
            .iter()
            .map(|g| (inp.local[*g].layer, std::ptr::from_ref(inp.local[*g].ports) as usize, inp.local[*g].np_rule))
            .collect();
        starts.sort_unstable();
        let key = (parent_serial, class, starts);
        match memo.with_local.get(&key) {
            Some(r) => r.clone(),
            None => {
                let r = Rc::new(region(inp, here, parent, parent_blocks, interned));
                memo.with_local.insert(key, r.clone());
                r
            }
        }
    };
    (region, parent_blocks.clone())
}

/// The region at a prefix: the parent's plus the plain grants starting here, with the
/// blocks covering it, evaluated.
fn region(inp: &Inputs, here: &Here, parent: Option<&Frame>, blocks: &[usize], interned: &mut Interned) -> Region {
    let mut plain = parent.map(|f| f.region.plain.clone()).unwrap_or_default();
    let mut np_rules = parent.map(|f| f.region.np_rules.clone()).unwrap_or_default();
    if let Some(class) = here.class {
        for (pos, ports) in &inp.merged.classes[class as usize] {
            plain.entry(inp.merged_layers[*pos]).or_default().union_with(ports);
        }
    }
    for &g in &here.plain {
        let g = &inp.local[g];
        plain.entry(g.layer).or_default().union_with(g.ports);
        np_rules.extend(g.np_rule);
    }
    np_rules.sort_unstable();
    np_rules.dedup();
    let mut at = plain.clone();
    let mut at_np_rules = np_rules.clone();
    for &b in blocks {
        let g = &inp.local[b];
        at.entry(g.layer).or_default().union_with(g.ports);
        at_np_rules.extend(g.np_rule);
    }
    let (value, rules) = evaluate(inp.layers, &at, &at_np_rules, inp.np_rules);
    let empty = PortSet::empty();
    let parent_value = parent.map(|f| &f.region.value).unwrap_or(&empty);
    let entry = (value != *parent_value).then(|| (interned.port_set(&value), interned.rules(rules)));
    Region { plain, np_rules, value, entry }
}

/// What the entry at `prefix` stands for: the origins of the grants starting there, the
/// excepts ending there, and for a root the tiers' defaults.
fn stands_for(inp: &Inputs, here: &Here, merged: Option<&Arc<[Origin]>>, prefix: &Prefix) -> Arc<[Origin]> {
    let local_only_merged = here.plain.is_empty() && here.blocks.is_empty() && here.excepts.is_empty();
    // Most entries stand for one peer (a pod) of the merged rules: its list is shared.
    if let Some(m) = merged.filter(|_| local_only_merged && prefix.len() != 0) {
        return m.clone();
    }
    // Most of the others stand for one grant of the endpoint's own (a NetworkPolicy peer).
    if let ([g], [], [], None) = (here.plain.as_slice(), here.blocks.as_slice(), here.excepts.as_slice(), merged) {
        if prefix.len() != 0 {
            return Origin::shared(std::slice::from_ref(inp.local[*g].origin));
        }
    }
    let mut origins: BTreeSet<Origin> = BTreeSet::new();
    if prefix.len() == 0 {
        origins.insert(Origin::Remainder);
    }
    origins.extend(merged.into_iter().flat_map(|m| m.iter().cloned()));
    for &g in here.plain.iter().chain(&here.blocks) {
        origins.insert(inp.local[g].origin.clone());
    }
    for &g in &here.excepts {
        origins.insert(Origin::Except { cidr: inp.local[g].cidr, except: *prefix });
    }
    Origin::shared(&origins.into_iter().collect::<Vec<_>>())
}
