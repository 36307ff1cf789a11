use super::*;
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use std::io::Write;

fn tokens(prompt: u64, output: u64, total: u64) -> Option<Tokens> {
    Some(Tokens {
        prompt,
        output,
        total,
    })
}

/// Feeds `body` in pieces of `size` bytes.
fn tap_in_pieces(body: &[u8], gzip: bool, keep_head: usize, size: usize) -> BodyTap {
    let mut tap = BodyTap::new(gzip, keep_head);
    for piece in body.chunks(size) {
        tap.feed(piece);
    }
    tap
}

fn tap_whole(body: &[u8]) -> BodyTap {
    tap_in_pieces(body, false, 0, body.len().max(1))
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(body).unwrap();
    enc.finish().unwrap()
}

const GEMINI_JSON: &str = r#"{
  "candidates": [
{
  "content": {"parts": [{"text": "Hello there."}], "role": "model"},
  "finishReason": "STOP",
  "index": 0
}
  ],
  "usageMetadata": {
"promptTokenCount": 8,
"candidatesTokenCount": 3,
"totalTokenCount": 11,
"promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]
  },
  "modelVersion": "gemini-2.5-flash",
  "responseId": "abc"
}
"#;

/// Three SSE events, as `streamGenerateContent?alt=sse` sends them: usage grows, the
/// last event has the totals.
fn gemini_sse() -> String {
    let event = |text: &str, usage: &str| {
        format!(
            "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"{text}\"}}],\
             \"role\": \"model\"}},\"index\": 0}}],\"usageMetadata\": {usage},\
             \"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}}\r\n\r\n"
        )
    };
    [
        event("Hel", r#"{"promptTokenCount": 12,"totalTokenCount": 12}"#),
        event(
            "lo",
            r#"{"promptTokenCount": 12,"candidatesTokenCount": 2,"totalTokenCount": 14}"#,
        ),
        event(
            "!",
            r#"{"promptTokenCount": 12,"candidatesTokenCount": 345,"thoughtsTokenCount": 1000,"totalTokenCount": 1357}"#,
        ),
    ]
    .concat()
}

#[test]
fn plain_gemini_json() {
    assert_eq!(tap_whole(GEMINI_JSON.as_bytes()).tokens(), tokens(8, 3, 11));
}

#[test]
fn sse_stream_split_anywhere() {
    let body = gemini_sse();
    let body = body.as_bytes();
    let want = tokens(12, 1345, 1357);
    // Every two-piece split, which cuts the usage key, the numbers, the CRLFs, ...
    for cut in 0..=body.len() {
        let mut tap = BodyTap::new(false, 0);
        tap.feed(&body[..cut]);
        tap.feed(&body[cut..]);
        assert_eq!(tap.tokens(), want, "split at {cut}");
    }
    // One byte at a time.
    assert_eq!(tap_in_pieces(body, false, 0, 1).tokens(), want);
}

#[test]
fn sse_stream_mid_way_reports_usage_so_far() {
    let body = gemini_sse();
    let second_end = body.match_indices("\r\n\r\n").nth(1).unwrap().0 + 4;
    let mut tap = BodyTap::new(false, 0);
    tap.feed(&body.as_bytes()[..second_end]);
    assert_eq!(tap.tokens(), tokens(12, 2, 14));
    // Cut inside the last usage object: the previous, complete one is reported.
    let cut = body.rfind("\"thoughtsTokenCount\"").unwrap();
    let mut tap = BodyTap::new(false, 0);
    tap.feed(&body.as_bytes()[..cut]);
    assert_eq!(tap.tokens(), tokens(12, 2, 14));
}

#[test]
fn json_array_stream() {
    // Without alt=sse Gemini streams one pretty-printed JSON array, element by element.
    let pieces = [
        "[{\n  \"candidates\": [{\"content\": {\"parts\": [{\"text\": \"A\"}]}}],\n  \
         \"usageMetadata\": {\n    \"promptTokenCount\": 5,\n    \"totalTokenCount\": 5\n  }\n}\n",
        ",\r\n{\n  \"candidates\": [{\"content\": {\"parts\": [{\"text\": \"B\"}]}}],\n  \
         \"usageMetadata\": {\n    \"promptTokenCount\": 5,\n    \"candidatesTokenCount\": 7,\n    \
         \"totalTokenCount\": 12\n  }\n}\n",
        "]",
    ];
    let mut tap = BodyTap::new(false, 0);
    for p in pieces {
        tap.feed(p.as_bytes());
    }
    assert_eq!(tap.tokens(), tokens(5, 7, 12));
}

#[test]
fn openai_non_stream() {
    let body = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,
        "message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(3, 4, 7));
}

#[test]
fn openai_stream_with_null_usage_then_final_usage() {
    let mut body = String::new();
    for word in ["Hel", "lo", "!"] {
        body += &format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}],\"usage\":null}}\n\n"
        );
    }
    body += "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n";
    body += "data: [DONE]\n\n";
    assert_eq!(
        tap_in_pieces(body.as_bytes(), false, 0, 5).tokens(),
        tokens(9, 3, 12)
    );

    // Without stream_options.include_usage there is only null: no usage.
    let nulls = body
        .split("data: {\"id\":\"c\",\"choices\":[],")
        .next()
        .unwrap();
    assert_eq!(tap_whole(nulls.as_bytes()).tokens(), None);
}

#[test]
fn openai_usage_details_are_not_confused_with_counts() {
    let body = r#"{"choices":[],"usage":{
        "prompt_tokens_details":{"cached_tokens":100,"audio_tokens":0,"prompt_tokens":1},
        "prompt_tokens":150,"completion_tokens":40,"total_tokens":190,
        "completion_tokens_details":{"reasoning_tokens":30,"completion_tokens":2,"total_tokens":3}}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(150, 40, 190));
}

#[test]
fn gemini_thoughts_and_tool_prompt_are_summed() {
    let body = r#"{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,
        "thoughtsTokenCount":2,"totalTokenCount":9,"cachedContentTokenCount":1}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(3, 6, 9));

    // No total: prompt + output, with the tool-use prompt in the prompt.
    let body = r#"{"usageMetadata":{"promptTokenCount":3,"toolUsePromptTokenCount":5,
        "candidatesTokenCount":4,"thoughtsTokenCount":2}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(8, 6, 14));

    // Only some fields: the rest are 0.
    let body = r#"{"usageMetadata":{"totalTokenCount":9}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(0, 0, 9));
}

#[test]
fn gzipped_answer_in_seven_byte_pieces() {
    let body = gemini_sse();
    let tap = tap_in_pieces(&gzip(body.as_bytes()), true, 64 * 1024, 7);
    assert_eq!(tap.tokens(), tokens(12, 1345, 1357));
    assert_eq!(tap.head(), Some(body.as_bytes()));
}

#[test]
fn gzip_header_fields_and_members() {
    // FEXTRA, FNAME, FCOMMENT set (and skipped), fed one byte at a time.
    let mut enc = GzBuilder::new()
        .extra(vec![7u8; 300])
        .filename("answer.json")
        .comment("a comment")
        .write(Vec::new(), Compression::fast());
    enc.write_all(GEMINI_JSON.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let tap = tap_in_pieces(&gz, true, 4096, 1);
    assert_eq!(tap.tokens(), tokens(8, 3, 11));
    assert_eq!(tap.head(), Some(GEMINI_JSON.as_bytes()));

    // Two members make one body (RFC 1952 2.2).
    let (a, b) = GEMINI_JSON.split_at(100);
    let two = [gzip(a.as_bytes()), gzip(b.as_bytes())].concat();
    let tap = tap_in_pieces(&two, true, 4096, 3);
    assert_eq!(tap.tokens(), tokens(8, 3, 11));
    assert_eq!(tap.head(), Some(GEMINI_JSON.as_bytes()));
}

/// 5 MB of SSE text events (each with partial usage), then the final totals.
fn big_stream() -> Vec<u8> {
    let text = "lorem ipsum dolor sit amet ".repeat(40);
    let mut body = Vec::new();
    let mut n = 0u64;
    while body.len() < 5_000_000 {
        n += 1;
        body.extend_from_slice(
            format!(
                "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{text}\"}}]}}}}],\
                 \"usageMetadata\":{{\"promptTokenCount\":7,\"candidatesTokenCount\":{n},\"totalTokenCount\":{}}}}}\r\n\r\n",
                n + 7
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        b"data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":7,\
          \"candidatesTokenCount\":250000,\"totalTokenCount\":250007}}\r\n\r\n",
    );
    body
}

#[test]
fn five_megabytes_keep_memory_bounded() {
    let body = big_stream();
    let keep_head = 4096;
    let bound = keep_head + TAIL_BUF;
    for size in [1000, 4096, 16 * 1024, 100_000] {
        let mut tap = BodyTap::new(false, keep_head);
        for piece in body.chunks(size) {
            tap.feed(piece);
            assert!(
                tap.held() <= bound,
                "held {} with {size}-byte chunks",
                tap.held()
            );
        }
        assert_eq!(tap.tokens(), tokens(7, 250_000, 250_007));
        assert_eq!(tap.head(), None);
    }
    // One 5 MB chunk: only its end is copied.
    let tap = tap_whole(&body);
    assert!(tap.held() <= TAIL_BUF);
    assert_eq!(tap.tokens(), tokens(7, 250_000, 250_007));
}

#[test]
fn five_megabytes_gzipped_keep_memory_bounded() {
    let body = big_stream();
    let gz = {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&body).unwrap();
        enc.finish().unwrap()
    };
    let mut tap = BodyTap::new(true, 1024);
    for piece in gz.chunks(16 * 1024) {
        tap.feed(piece);
        assert!(tap.held() <= 1024 + TAIL_BUF);
    }
    assert_eq!(tap.tokens(), tokens(7, 250_000, 250_007));
    assert_eq!(tap.head(), None);
}

#[test]
fn gzip_bomb_stops_at_the_decoded_limit() {
    let gz = gzip(&vec![b' '; 4 << 20]);
    // Under the (default) limit the same body decodes to its end.
    let tap = tap_whole_gzip(&gz);
    assert_eq!(tap.gunzip.as_ref().map(|g| g.step), Some(Step::Done));
    let mut tap = BodyTap::new(true, 1024);
    if let Some(g) = tap.gunzip.as_mut() {
        g.max_decoded = 1 << 20;
    }
    tap.feed(&gz);
    assert_eq!(tap.gunzip.as_ref().map(|g| g.step), Some(Step::Failed));
    assert!(tap.held() <= 1024 + TAIL_BUF);
    assert_eq!(tap.head(), None);
}

#[test]
fn corrupt_gzip_keeps_what_was_found_before() {
    let body = gemini_sse();
    let good = tap_in_pieces(&gzip(body.as_bytes()), true, 0, 7);
    assert_eq!(good.tokens(), tokens(12, 1345, 1357));

    // Compress the first two events and flush them out (as a streaming server does), then
    // garble what follows: decoding stops, head() is None, and tokens() reports the usage
    // that came through before.
    let second_end = body.match_indices("\r\n\r\n").nth(1).unwrap().0 + 4;
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(&body.as_bytes()[..second_end]).unwrap();
    enc.flush().unwrap();
    let flushed = enc.get_ref().len();
    enc.write_all(&body.as_bytes()[second_end..]).unwrap();
    let mut gz = enc.finish().unwrap();
    let end = gz.len() - 8;
    // 0xff right after a flush starts a block of the reserved type 11: an error. (Most
    // garbling is caught the same way; some only leaves the decoder waiting for more.)
    gz[flushed..end].fill(0xff);
    let tap = tap_in_pieces(&gz, true, 64 * 1024, 7);
    assert_eq!(tap.gunzip.as_ref().map(|g| g.step), Some(Step::Failed));
    assert_eq!(tap.head(), None);
    assert_eq!(tap.tokens(), tokens(12, 2, 14));

    // A bad checksum: the text decodes, but the body is not trusted as a whole.
    let mut gz = gzip(GEMINI_JSON.as_bytes());
    let n = gz.len();
    gz[n - 8] ^= 1;
    let tap = tap_in_pieces(&gz, true, 64 * 1024, 7);
    assert_eq!(tap.head(), None);

    // Not gzip at all.
    let tap = tap_in_pieces(GEMINI_JSON.as_bytes(), true, 64 * 1024, 7);
    assert_eq!(tap.head(), None);
    assert_eq!(tap.tokens(), None);
}

#[test]
fn truncated_gzip_has_no_head() {
    let gz = gzip(GEMINI_JSON.as_bytes());
    let tap = tap_whole_gzip(&gz[..gz.len() - 3]);
    assert_eq!(tap.head(), None);
    // All of the text was decoded; only the trailer is missing.
    assert_eq!(tap.tokens(), tokens(8, 3, 11));
}

#[test]
fn truncated_big_gzip_decodes_to_the_cut() {
    // All the deflate data, no trailer, fed in small pieces: every decoded byte comes out,
    // including what the inflater still held when the input ran out.
    let body = big_stream();
    let gz = gzip(&body);
    let cut = &gz[..gz.len() - 8];
    for size in [50, 1000, 16 * 1024] {
        let tap = tap_in_pieces(cut, true, 0, size);
        assert_eq!(
            tap.gunzip.as_ref().map(|g| g.decoded),
            Some(body.len() as u64)
        );
        assert_eq!(
            tap.tokens(),
            tokens(7, 250_000, 250_007),
            "{size}-byte pieces"
        );
        assert_eq!(tap.head(), None);
    }
}

fn tap_whole_gzip(gz: &[u8]) -> BodyTap {
    tap_in_pieces(gz, true, 64 * 1024, gz.len().max(1))
}

#[test]
fn no_usage_is_none() {
    let error =
        r#"{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}"#;
    assert_eq!(tap_whole(error.as_bytes()).tokens(), None);
    assert_eq!(tap_whole(b"").tokens(), None);
    assert_eq!(BodyTap::new(true, 10).tokens(), None);
    // Keys that only look alike, and usage objects without any count.
    for body in [
        r#"{"usage_metadata":{"prompt_tokens":1},"usages":{"prompt_tokens":1}}"#,
        r#"{"usage":{"foo":1},"usageMetadata":{"promptTokenCount":"3"}}"#,
        r#"{"type":"usage","usage":[1,2],"usageMetadata":null}"#,
        r#"{"usage": {"prompt_tokens": 3, "completion_tokens": 4"#,
    ] {
        assert_eq!(tap_whole(body.as_bytes()).tokens(), None, "{body}");
    }
}

#[test]
fn escaped_usage_in_model_text_is_ignored() {
    let body = r#"{"choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 999} field"}}],
        "usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(3, 4, 7));

    // Even when the text comes after the real usage and mimics it with balanced quoting.
    let body = r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},
        "note":"x\\\"usage\": {\"prompt_tokens\": 999, \"completion_tokens\": 1}",
        "more":"\"usageMetadata\":{\"promptTokenCount\":999}"}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(3, 4, 7));

    // A key that is the text `"usage` (its quote escaped) is not the usage key.
    let body = r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},
        "args":{"\"usage": {"prompt_tokens": 999}}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(3, 4, 7));

    // A string holding a quote-balanced object after the real key is skipped while
    // balancing: `}` inside strings does not close the object.
    let body = r#"{"usageMetadata":{"cachedContentTokensDetails":[{"modality":"}{\"x"}],
        "promptTokenCount":2,"candidatesTokenCount":1,"totalTokenCount":3}}"#;
    assert_eq!(tap_whole(body.as_bytes()).tokens(), tokens(2, 1, 3));
}

#[test]
fn head_is_the_small_body_only() {
    let body = GEMINI_JSON.as_bytes();
    let tap = tap_in_pieces(body, false, body.len(), 10);
    assert_eq!(tap.head(), Some(body));
    let tap = tap_in_pieces(body, false, body.len() - 1, 10);
    assert_eq!(tap.head(), None);
    assert_eq!(tap.tokens(), tokens(8, 3, 11));
    let tap = tap_in_pieces(body, false, 0, 10);
    assert_eq!(tap.head(), None);
    assert_eq!(BodyTap::new(false, 10).head(), Some(&b""[..]));

    // Gzipped: the decoded size counts, not the wire size.
    let gz = gzip(body);
    assert!(gz.len() < body.len());
    assert_eq!(tap_whole_gzip_head(&gz, body.len()).head(), Some(body));
    assert_eq!(tap_whole_gzip_head(&gz, body.len() - 1).head(), None);
}

fn tap_whole_gzip_head(gz: &[u8], keep_head: usize) -> BodyTap {
    tap_in_pieces(gz, true, keep_head, 7)
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic generator: no extra dependency.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let alphabet = b"{}[]\":,\\ usageMetadata_prompt_tokens0123456789nul\r\n\x1f\x8b\x08";
    for round in 0..200 {
        let len = (next() % 3000) as usize;
        let body: Vec<u8> = (0..len)
            .map(|_| {
                let r = next();
                if round % 2 == 0 {
                    alphabet[(r % alphabet.len() as u64) as usize]
                } else {
                    r as u8
                }
            })
            .collect();
        for gzip in [false, true] {
            let tap = tap_in_pieces(&body, gzip, 100, 1 + round % 17);
            let _ = tap.tokens();
            let _ = tap.head();
        }
        // A valid gzip header followed by noise.
        let noisy = [&[0x1f, 0x8b, 8, 0x1e, 0, 0, 0, 0, 0, 3][..], &body].concat();
        let tap = tap_in_pieces(&noisy, true, 100, 1 + round % 5);
        let _ = tap.tokens();
    }
    // Pathological nesting and unterminated objects after many keys.
    let deep = format!("{}{}", "\"usage\":{".repeat(5000), "[".repeat(20000));
    assert_eq!(tap_whole(deep.as_bytes()).tokens(), None);
    let nested = format!(
        "{{\"usage\":{}{}}}",
        "{\"a\":".repeat(300),
        "1}".repeat(300)
    );
    let _ = tap_whole(nested.as_bytes()).tokens();
}

#[test]
fn gives_up_after_max_tries() {
    let real = r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    let nulls = |n: usize| format!("{real}{}", r#"{"usage":null}"#.repeat(n));
    assert_eq!(
        tap_whole(nulls(MAX_TRIES - 1).as_bytes()).tokens(),
        tokens(3, 4, 7)
    );
    assert_eq!(tap_whole(nulls(MAX_TRIES).as_bytes()).tokens(), None);
}

#[test]
fn a_kept_prefix_is_the_start_of_a_longer_body() {
    let body = GEMINI_JSON.as_bytes();
    for size in [1, 7, 10, body.len()] {
        let mut tap = BodyTap::new(false, 20).keeping_prefix();
        for piece in body.chunks(size) {
            tap.feed(piece);
            assert!(tap.held() <= 20 + TAIL_BUF);
        }
        assert_eq!(tap.prefix(), &body[..20], "{size}-byte chunks");
        assert_eq!(tap.head(), None, "a prefix is no whole head");
    }
    let mut whole = BodyTap::new(false, body.len()).keeping_prefix();
    whole.feed(body);
    assert_eq!(whole.prefix(), body);
    assert_eq!(whole.head(), Some(body));
    // Gzipped: the decoded start.
    let mut tap = BodyTap::new(true, 20).keeping_prefix();
    for piece in gzip(body).chunks(7) {
        tap.feed(piece);
    }
    assert_eq!(tap.prefix(), &body[..20]);
    // Without it, a body that outgrew the head leaves nothing.
    assert!(tap_in_pieces(body, false, 20, 7).prefix().is_empty());
}
