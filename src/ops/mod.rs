//! What operators touch: the admin API and its dashboard, the key check, the state file that carries health and
//! affinity over restarts, and the process's life (signals, reload, readiness).

pub mod admin;
pub mod dashboard;
pub mod keycheck;
pub mod lifecycle;
pub mod state;
