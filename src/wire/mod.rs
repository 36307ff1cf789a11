pub mod error;
pub mod json_strings;
pub mod names;
pub mod path;
pub mod request;
pub mod scrub;
pub mod usage;
