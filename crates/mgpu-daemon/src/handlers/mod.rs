//! One handler per request type.

pub mod cancel;
pub mod log;
pub mod queue;
pub mod submit;
