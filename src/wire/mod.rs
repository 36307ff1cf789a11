//! Requests and answers as text: paths and queries as keygate and Google both read them, JSON
//! strings, resource names, the upstream request, model aliases, CORS, token usage, keys
//! scrubbed from answers, and keygate's own Gemini-shaped errors. Knows nothing of keys or
//! tenants.

pub mod alias;
pub mod cors;
pub mod error;
pub mod json_strings;
pub mod names;
pub mod path;
pub mod request;
pub mod scrub;
pub mod usage;
