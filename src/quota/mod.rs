//! Quotas: what Google's answers mean, and which key serves next.
//!
//! - [`classify`]: an upstream answer → an outcome and a verdict (pure);
//! - [`keys`]: the key pool and its health table: picking a key, and the one door every change
//!   of a key's health goes through;
//! - [`plan`]: one request's attempts: which key next, what each answer means (pure);
//! - [`affinity`]: which project owns a file, cache, batch..., and uploads in progress.

pub mod affinity;
pub mod classify;
pub mod keys;
pub mod plan;
