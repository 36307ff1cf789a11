pub mod admin;
pub mod keycheck;
pub mod lifecycle;
pub mod state;
