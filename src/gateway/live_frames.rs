//! The WebSocket frames a client sends in a Live API session, read so that each message can be
//! checked before it goes on to Google. A Live message can name files like any request
//! (`clientContent.turns[].parts[].fileData.fileUri`), so with tenants each one is read as a
//! request body is.
//!
//! Frames pass through byte for byte; only their order changes, as the protocol allows: a data
//! message is held until its last fragment has arrived and it was checked, while control frames
//! (ping, pong, close) that come between its fragments go on at once. keygate takes the
//! per-message compression extension out of the handshake, so payloads are plain.

use crate::config::ClientLimits;
use crate::gateway::guard;
use crate::quota::affinity::Affinity;
use crate::quota::keys::Millis;
use crate::runtime::budget::Reservation;
use crate::{wire::names, wire::request};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::time::Instant;

/// What a tenant's Live session checks in the client's messages: each must be strict JSON
/// naming only the tenant's resources in the session's project; what a message in progress
/// holds counts against the body memory budget, and it must arrive as a request body must.
#[derive(Debug)]
pub struct MessageCheck {
    tenant: Arc<str>,
    /// The project whose key serves the session.
    project: Arc<str>,
    frames: ClientFrames,
    /// The held bytes' share of the body memory budget.
    reservation: Reservation,
    limits: ClientLimits,
    /// When the first byte of the message being assembled came, and the last.
    message_started: Option<Instant>,
    last_progress: Instant,
}

impl MessageCheck {
    /// The check of `tenant`'s session on a key of `project`, for messages of at most
    /// `max_message` bytes, holding them within `reservation`.
    pub fn new(
        tenant: Arc<str>,
        project: Arc<str>,
        max_message: usize,
        reservation: Reservation,
        limits: ClientLimits,
    ) -> MessageCheck {
        MessageCheck {
            tenant,
            project,
            frames: ClientFrames::new(max_message),
            reservation,
            limits,
            message_started: None,
            last_progress: Instant::now(),
        }
    }

    /// The session's tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// By when the message being assembled must be whole; None between messages.
    pub fn due(&self) -> Option<Instant> {
        let started = self.message_started?;
        let held = self.frames.buffered();
        Some(guard::body_due(
            &self.limits,
            started,
            self.last_progress,
            held,
        ))
    }

    /// Takes the client's next bytes: the frames that may go on to Google, or why the session
    /// ends. Each message is checked against the owners `owners` knows (the gateway asks the
    /// fleet about unknown names in between: `Gateway::checked`).
    #[cfg(test)]
    pub fn feed(
        &mut self,
        bytes: &[u8],
        owners: &Affinity,
        now: Millis,
    ) -> Result<Vec<Bytes>, Close> {
        let mut out = Vec::new();
        for item in self.take(bytes)? {
            match item {
                Ready::Control(frame) => out.push(frame),
                Ready::Message { frames, payload } => {
                    self.check_message(&payload, owners, now)?;
                    out.push(frames);
                }
            }
        }
        Ok(out)
    }

    /// Takes the client's next bytes: the control frames that go on at once and the messages
    /// completed here, each still to be checked ([`MessageCheck::check_message`]).
    pub fn take(&mut self, bytes: &[u8]) -> Result<Vec<Ready>, Close> {
        let ready = self.frames.feed(bytes).map_err(|e| Close {
            code: e.close_code(),
            reason: format!("keygate: {e}"),
        })?;
        let held = self.frames.buffered();
        if !self.reservation.resize(held) {
            return Err(Close {
                code: 1013,
                reason:
                    "keygate: too many request bodies are held in memory right now; retry shortly"
                        .into(),
            });
        }
        // A message that completed here ends its clock; what is held now is the next one's.
        let completed = ready.iter().any(|r| matches!(r, Ready::Message { .. }));
        self.last_progress = Instant::now();
        self.message_started = match (held, self.message_started) {
            (0, _) => None,
            (_, Some(started)) if !completed => Some(started),
            _ => Some(self.last_progress),
        };
        Ok(ready)
    }

    /// The resource names `payload` holds that `owners` does not know: to be asked of the
    /// other instances before the message is checked.
    pub fn unknown_names(&self, payload: &[u8], owners: &Affinity, now: Millis) -> Vec<String> {
        let names = names::names_in_body(payload);
        if names.len() > names::MAX_NAMES {
            return Vec::new();
        }
        names
            .into_iter()
            .filter(|name| owners.owner(name, now).is_none())
            .collect()
    }

    /// Whether `payload` may go on to Google: strict JSON naming only the tenant's resources in
    /// the session's project.
    pub fn check_message(
        &self,
        payload: &[u8],
        owners: &Affinity,
        now: Millis,
    ) -> Result<(), Close> {
        let policy = |reason: String| Close { code: 1008, reason };
        request::strict_json(payload).map_err(|why| Close {
            code: 1007,
            reason: format!("keygate: {why}"),
        })?;
        let names = names::names_in_body(payload);
        if names.len() > names::MAX_NAMES {
            return Err(policy("keygate: a message names too many resources".into()));
        }
        for name in names {
            let mine = owners.owner(&name, now).is_some_and(|o| {
                o.tenant.as_deref() == Some(&*self.tenant) && o.project == self.project
            });
            if !mine {
                return Err(policy(format!(
                    "keygate: {name} is not this tenant's in this session's project"
                )));
            }
        }
        Ok(())
    }
}

/// Why keygate ends a session: a close code (RFC 6455, 7.4.1) and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The close code.
    pub code: u16,
    /// The reason, for the client and the log.
    pub reason: String,
}

impl Close {
    /// A message in progress came too slowly.
    pub fn too_slow() -> Close {
        Close {
            code: 1008,
            reason: "keygate: a message came too slowly (client_limits.body_timeout_seconds, body_min_rate_bytes_per_second)".into(),
        }
    }

    /// The close frame to send the client.
    pub fn frame(&self) -> Bytes {
        close_frame(self.code, &self.reason)
    }
}

/// What the client's bytes have made ready to go on.
#[derive(Debug, PartialEq, Eq)]
pub enum Ready {
    /// A control frame, as it came.
    Control(Bytes),
    /// A whole data message, to check.
    Message {
        /// Its frames as they came.
        frames: Bytes,
        /// Its payload, unmasked.
        payload: Vec<u8>,
    },
}

/// Why the client's frames cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A reserved bit or opcode, a fragmented or oversized control frame, or a continuation
    /// without a message.
    #[error("malformed WebSocket frame")]
    Malformed,
    /// A message longer than the limit.
    #[error("message too long")]
    TooLong,
}

impl FrameError {
    /// The close code to answer with (RFC 6455, 7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Malformed => 1002,
            FrameError::TooLong => 1009,
        }
    }
}

/// Reads a client's frames as they arrive.
#[derive(Debug)]
pub struct ClientFrames {
    /// Bytes of a frame not yet whole.
    pending: BytesMut,
    /// The frames of the data message being assembled, as they came, with where each one's
    /// payload starts and its mask: the payload is unmasked only once the message is whole, so
    /// a message is held once, not twice.
    held: Vec<(Bytes, usize, Option<[u8; 4]>)>,
    /// Payload bytes of the held frames.
    held_payload: usize,
    /// Bytes of the held frames.
    held_bytes: usize,
    max_message: usize,
}

impl ClientFrames {
    /// A reader that refuses messages over `max_message` bytes.
    pub fn new(max_message: usize) -> ClientFrames {
        ClientFrames {
            pending: BytesMut::new(),
            held: Vec::new(),
            held_payload: 0,
            held_bytes: 0,
            max_message,
        }
    }

    /// Bytes held now: a message in progress and a frame not yet whole. Zero between messages.
    pub fn buffered(&self) -> usize {
        self.pending.len() + self.held_bytes
    }

    /// Takes the next bytes from the client; what they complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Ready>, FrameError> {
        self.pending.extend_from_slice(bytes);
        let mut ready = Vec::new();
        while let Some(header) = Header::parse(&self.pending)? {
            let data = header.opcode < 8;
            let max = self.max_message as u64;
            if header.len > max || (data && self.held_payload as u64 + header.len > max) {
                return Err(FrameError::TooLong);
            }
            // Wait for the rest of the frame (at most a message's worth).
            let total = header.size + header.len as usize;
            if self.pending.len() < total {
                break;
            }
            let frame = self.pending.split_to(total).freeze();
            match header.opcode {
                8..=10 => {
                    if !header.fin || header.len > 125 {
                        return Err(FrameError::Malformed);
                    }
                    ready.push(Ready::Control(frame));
                    continue;
                }
                1 | 2 if self.held.is_empty() => {}
                0 if !self.held.is_empty() => {}
                _ => return Err(FrameError::Malformed),
            }
            self.held_payload += header.len as usize;
            self.held_bytes += frame.len();
            self.held.push((frame, header.size, header.mask));
            if header.fin {
                ready.push(self.take_message());
            }
        }
        Ok(ready)
    }

    /// The held message, whole: its frames as they came and its payload unmasked.
    fn take_message(&mut self) -> Ready {
        let mut frames = BytesMut::with_capacity(self.held_bytes);
        let mut payload = Vec::with_capacity(self.held_payload);
        for (frame, start, mask) in self.held.drain(..) {
            let at = payload.len();
            payload.extend_from_slice(&frame[start..]);
            if let Some(mask) = mask {
                for (i, b) in payload[at..].iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            frames.extend_from_slice(&frame);
        }
        self.held_payload = 0;
        self.held_bytes = 0;
        Ready::Message {
            frames: frames.freeze(),
            payload,
        }
    }
}

/// A frame's header.
#[derive(Debug)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Payload length.
    len: u64,
    /// Header length.
    size: usize,
}

impl Header {
    /// The header at the start of `bytes`; None while it is incomplete.
    fn parse(bytes: &[u8]) -> Result<Option<Header>, FrameError> {
        let (Some(&b0), Some(&b1)) = (bytes.first(), bytes.get(1)) else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(FrameError::Malformed);
        }
        let (len, mut size) = match b1 & 0x7f {
            126 => match bytes.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match bytes.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(b) => (u64::from_be_bytes(b), 10),
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let Some(key) = bytes.get(size..size + 4) else {
                return Ok(None);
            };
            size += 4;
            Some([key[0], key[1], key[2], key[3]])
        } else {
            None
        };
        Ok(Some(Header {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            mask,
            len,
            size,
        }))
    }
}

/// A close frame from the server (unmasked) with `code` and a reason cut to fit the 125-byte
/// control payload.
fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut reason = reason.as_bytes();
    let mut cut = reason.len().min(123);
    while cut > 0 && std::str::from_utf8(&reason[..cut]).is_err() {
        cut -= 1;
    }
    reason = &reason[..cut];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88);
    frame.push((2 + reason.len()) as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked, as clients must send them.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![u8::from(fin) << 7 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn messages_come_whole_and_unmasked_in_any_chunking() {
        let text = br#"{"clientContent":{"turns":[{"parts":[{"text":"hi"}]}]}}"#;
        let big = vec![b'a'; 70_000];
        let mut wire = frame(false, 1, &text[..10]);
        wire.extend(frame(true, 9, b"ping"));
        wire.extend(frame(true, 0, &text[10..]));
        wire.extend(frame(true, 2, &big));
        for chunk in [1, 3, 7, 100, wire.len()] {
            let mut reader = ClientFrames::new(1 << 20);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                got.extend(reader.feed(piece).unwrap());
            }
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert!(matches!(&got[0], Ready::Control(f) if f[0] == 0x89));
            let Ready::Message { frames, payload } = &got[1] else {
                panic!("{got:?}")
            };
            assert_eq!(payload, text);
            // The frames go on as they came.
            let mut want = frame(false, 1, &text[..10]);
            want.extend(frame(true, 0, &text[10..]));
            assert_eq!(&frames[..], &want[..]);
            assert!(matches!(&got[2], Ready::Message { payload, .. } if *payload == big));
        }
    }

    #[test]
    fn what_is_held_is_counted() {
        let mut reader = ClientFrames::new(1 << 20);
        let first = frame(false, 1, &[b'a'; 1000]);
        assert_eq!(reader.feed(&first[..500]), Ok(vec![]));
        assert_eq!(reader.buffered(), 500);
        assert_eq!(reader.feed(&first[500..]), Ok(vec![]));
        assert_eq!(reader.buffered(), first.len());
        let got = reader.feed(&frame(true, 0, b"b")).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn malformed_and_long_messages_are_refused() {
        let mut reader = ClientFrames::new(1 << 20);
        assert_eq!(
            reader.feed(&frame(true, 0, b"x")),
            Err(FrameError::Malformed)
        );
        let mut rsv = frame(true, 1, b"x");
        rsv[0] |= 0x40; // a compressed frame: no extension was agreed
        assert_eq!(
            ClientFrames::new(100).feed(&rsv),
            Err(FrameError::Malformed)
        );
        assert_eq!(
            ClientFrames::new(100).feed(&frame(false, 9, b"p")),
            Err(FrameError::Malformed)
        );
        let mut reader = ClientFrames::new(100);
        assert_eq!(reader.feed(&frame(false, 1, &[b'a'; 60])), Ok(vec![]));
        assert_eq!(
            reader.feed(&frame(true, 0, &[b'a'; 60])),
            Err(FrameError::TooLong)
        );
        // A header announcing more than the limit is refused before its payload comes.
        let header = [0x81, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            ClientFrames::new(1 << 20).feed(&header),
            Err(FrameError::TooLong)
        );
    }

    fn owner(project: &str, tenant: &str) -> crate::quota::affinity::Owner {
        crate::quota::affinity::Owner {
            pool: Arc::from("main"),
            project: Arc::from(project),
            tenant: Some(Arc::from(tenant)),
        }
    }

    fn limits() -> ClientLimits {
        ClientLimits {
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(10),
            body_min_rate: 0,
            send_timeout: std::time::Duration::from_secs(60),
            max_connections: None,
            max_buffered_body_bytes: 1000,
        }
    }

    #[tokio::test]
    async fn a_tenants_messages_name_only_its_resources_in_the_sessions_project() {
        let owners = Affinity::new(100);
        owners.bind_new("files/mine", owner("p1", "bob"), 0);
        owners.bind_new("files/elsewhere", owner("p2", "bob"), 0);
        owners.bind_new("files/alices", owner("p1", "alice"), 0);
        let budget = crate::runtime::budget::BodyBudget::new(1000);
        let session = || {
            MessageCheck::new(
                Arc::from("bob"),
                Arc::from("p1"),
                1 << 20,
                budget.reservation(None),
                limits(),
            )
        };
        let turn = |file: &str| {
            frame(
                true,
                1,
                format!(r#"{{"clientContent":{{"turns":[{{"parts":[{{"fileData":{{"fileUri":"{file}"}}}}]}}]}}}}"#)
                    .as_bytes(),
            )
        };
        let wire = turn("files/mine");
        assert_eq!(
            session().feed(&wire, &owners, 1),
            Ok(vec![Bytes::from(wire)])
        );
        for (wire, code) in [
            (turn("files/alices"), 1008),
            (turn("files/elsewhere"), 1008),
            (turn("files/unknown"), 1008),
            (frame(true, 1, b"{turns:[]}"), 1007),
            (frame(true, 0, b"x"), 1002),
        ] {
            let got = session().feed(&wire, &owners, 1).map_err(|c| c.code);
            assert_eq!(got, Err(code), "{}", String::from_utf8_lossy(&wire));
        }
        // A message in progress holds budget and has a deadline; a whole one gives both back.
        let mut check = session();
        let first = frame(false, 1, &[b'a'; 600]);
        assert_eq!(check.feed(&first, &owners, 1), Ok(vec![]));
        assert_eq!(budget.used(), first.len());
        assert!(check.due().is_some());
        let over = session().feed(&frame(false, 1, &[b'a'; 600]), &owners, 1);
        assert_eq!(over.map_err(|c| c.code), Err(1013));
        // (600 letters are no JSON.)
        let rest = frame(true, 0, b"");
        assert_eq!(check.feed(&rest, &owners, 1).map_err(|c| c.code), Err(1007));
        drop(check);
        assert_eq!(budget.used(), 0);
        let body = [b"{\"a\":\"".to_vec(), vec![b'a'; 590], b"\"}".to_vec()].concat();
        let mut check = session();
        let (head, tail) = body.split_at(300);
        let (a, b) = (frame(false, 1, head), frame(true, 0, tail));
        assert_eq!(check.feed(&a, &owners, 1), Ok(vec![]));
        let sent = check.feed(&b, &owners, 1).unwrap();
        assert_eq!(sent, vec![Bytes::from([a, b].concat())]);
        assert_eq!(budget.used(), 0);
        assert!(check.due().is_none());
    }

    #[test]
    fn close_frames_fit_a_control_frame() {
        let f = close_frame(1008, &"é".repeat(100));
        assert_eq!(f[0], 0x88);
        assert!(f.len() <= 127);
        assert_eq!(f[1] as usize, f.len() - 2);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 1008);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
