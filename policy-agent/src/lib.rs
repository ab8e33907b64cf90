//! policy-agent
