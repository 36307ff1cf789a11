//! Client authentication: which tenant a request belongs to.
//!
//! Tokens are kept only as SHA-256 digests and looked up by the digest of what the client
//! presents, so no comparison ever runs over the secret itself and the lookup time does not
//! depend on how much of a guess was right.

use crate::config::TenantConfig;
use crate::secret::sha256;
use std::collections::HashMap;
use std::sync::Arc;

/// The result of authenticating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No tenants are configured: everyone is let in.
    Open,
    /// The token belongs to this tenant.
    Tenant(Arc<str>),
    /// Tenants are configured and the request carries no token.
    Missing,
    /// The request carries a token nobody owns.
    Wrong,
}

/// The configured tenants.
#[derive(Debug, Default)]
pub struct Tenants {
    by_digest: HashMap<[u8; 32], Arc<str>>,
}

impl Tenants {
    /// Builds the lookup table.
    pub fn new(tenants: &[TenantConfig]) -> Tenants {
        Tenants {
            by_digest: tenants
                .iter()
                .map(|t| (t.token_sha256, Arc::from(t.name.as_str())))
                .collect(),
        }
    }

    /// Who presents `token`.
    pub fn authenticate(&self, token: Option<&[u8]>) -> Auth {
        if self.by_digest.is_empty() {
            return Auth::Open;
        }
        match token {
            None => Auth::Missing,
            Some([]) => Auth::Missing,
            Some(t) => match self.by_digest.get(&sha256(t)) {
                Some(name) => Auth::Tenant(name.clone()),
                None => Auth::Wrong,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticates_by_token_digest() {
        let t = Tenants::new(&[TenantConfig {
            name: "alice".into(),
            token_sha256: sha256(b"tok-alice"),
        }]);
        assert_eq!(
            t.authenticate(Some(b"tok-alice")),
            Auth::Tenant("alice".into())
        );
        assert_eq!(t.authenticate(Some(b"tok-alicf")), Auth::Wrong);
        assert_eq!(t.authenticate(Some(b"")), Auth::Missing);
        assert_eq!(t.authenticate(None), Auth::Missing);
        assert_eq!(Tenants::new(&[]).authenticate(None), Auth::Open);
    }
}
