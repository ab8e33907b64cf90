//! policy-ebpf: the datapath's kernel programs and the map types they share with user
//! space. The programs and the map layout arrive with the datapath work (issue 3); this
//! crate holds their place in the workspace so the layout is the product's from day one.
#![no_std]
