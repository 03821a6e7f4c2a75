//! One handler per request type.

pub mod acct;
pub mod attach;
pub mod cancel;
pub mod control;
pub mod depend;
pub mod follow;
pub mod log;
pub mod queue;
pub mod submit;
pub mod usage;
