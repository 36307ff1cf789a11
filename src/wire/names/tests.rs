use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn kinds_and_ttls() {
    assert_eq!(kind_of("files/abc"), Some(Kind::File));
    assert_eq!(kind_of("cachedContents/x-1"), Some(Kind::CachedContent));
    assert_eq!(kind_of("tunedModels/t.1"), Some(Kind::TunedModel));
    assert_eq!(kind_of("batches/b_1"), Some(Kind::Batch));
    assert_eq!(kind_of("operations/op"), Some(Kind::Operation));
    assert_eq!(kind_of("fileSearchStores/s"), Some(Kind::FileSearchStore));
    assert_eq!(kind_of("models/gemini"), None);
    assert_eq!(kind_of("Files/abc"), None);
    assert_eq!(kind_of("files/"), None);
    assert_eq!(kind_of("files"), None);
    assert_eq!(kind_of("files/a/b"), None);
    assert_eq!(kind_of("files/a b"), None);
    assert_eq!(
        kind_of(&format!("files/{}", "a".repeat(MAX_ID_LEN + 1))),
        None
    );
    assert_eq!(Kind::File.ttl(), Duration::from_secs(48 * 3600));
    assert_eq!(Kind::TunedModel.ttl(), Duration::from_secs(30 * 24 * 3600));
    for kind in [Kind::CachedContent, Kind::Batch, Kind::Operation] {
        assert_eq!(kind.ttl(), Duration::from_secs(7 * 24 * 3600));
    }
}

#[test]
fn path_forms() {
    let cases: [(&str, &[&str]); 16] = [
        ("/v1beta/files/abc", &["files/abc"]),
        ("/v1/files/abc:download", &["files/abc"]),
        ("/v1beta/cachedContents/xyz", &["cachedContents/xyz"]),
        (
            "/v1beta/tunedModels/my-model:generateContent",
            &["tunedModels/my-model"],
        ),
        ("/v1beta/batches/b1:cancel", &["batches/b1"]),
        ("/v1beta/operations/op1", &["operations/op1"]),
        ("/v1alpha/operations/op1?key=k", &["operations/op1"]),
        (
            "/v1beta/models/veo-2.0-generate-001/operations/op1",
            &["operations/op1"],
        ),
        (
            "/v1beta/tunedModels/t1/operations/o2",
            &["tunedModels/t1", "operations/o2"],
        ),
        ("/upload/v1beta/files/abc", &["files/abc"]),
        ("/v1beta/Files/abc", &["files/abc"]),
        ("/v1beta/files/abc%20x", &["files/abc"]),
        ("/v1beta/files", &[]),
        ("/upload/v1beta/files", &[]),
        ("/v1beta/models/gemini-2.0-flash:generateContent", &[]),
        ("/v1beta/files/:download", &[]),
    ];
    for (path, want) in cases {
        assert_eq!(names_in_path(path), names(want), "{path}");
    }
    assert!(names_in_path("").is_empty());
}

#[test]
fn body_reference_fields_in_every_spelling() {
    let body = br#"{"contents":[{"parts":[
        {"fileData":{"mimeType":"image/png","fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc"}},
        {"file_data":{"file_uri":"http://127.0.0.1:8080/v1/files/def-2"}},
        {"fileData":{"fileUri":"files\u002fghi_3"}},
        {"fileData":{"fileUri":"\u0066iles/jkl"}},
        {"fileData":{"fileUri":"https://h/v1beta/x/../files/mno"}},
        {"fileData":{"fileUri":"https://h/v1beta/files/%70qr"}},
        {"fileData":{"f\u0069leUri":" FILES/stu "}}]}],
        "cachedContent":"cachedContents/xyz","model":"tunedModels/t1"}"#;
    assert_eq!(
        names_in_body(body),
        names(&[
            "files/abc",
            "files/def-2",
            "files/ghi_3",
            "files/jkl",
            "files/mno",
            "files/pqr",
            "files/stu",
            "cachedContents/xyz",
            "tunedModels/t1"
        ])
    );
    let batch = br#"{"batch":{"inputConfig":{"fileName":"files/in1"}}}"#;
    assert_eq!(names_in_body(batch), names(&["files/in1"]));
    let escaped =
        br#"{"fileUri":"https:\/\/generativelanguage.googleapis.com\/v1beta\/files\/esc1"}"#;
    assert_eq!(names_in_body(escaped), names(&["files/esc1"]));
    let lenient = br#"{'fileUri': 'files/single'}"#;
    assert_eq!(names_in_body(lenient), names(&["files/single"]));
}

#[test]
fn mentions_outside_reference_fields_are_not_references() {
    for body in [
        &br#"{"functionCall":{"name":"read","args":{"fileName":"files/config.json"}}}"#[..],
        br#"{"functionResponse":{"name":"ls","response":{"fileUri":"files/x"}}}"#,
        br#"{"tools":[{"functionDeclarations":[{"parameters":{"properties":{"model":{"type":"string"}}}}]}]}"#,
        br#"{"text":"https://api.stripe.com/v1/files/file_123"}"#,
        br#"{"text":"https://github.com/org/repo/blob/v1.2.0/files/setup.py"}"#,
        br#"{"model":"models/gemini-2.5-flash"}"#,
        &br#"{"text":"see files/x and cachedContents/y"}"#[..],
        br#"{"functionCall":{"name":"read","args":{"path":"files/config.json"}}}"#,
        br#"{"text":"import x from \"./files/utils\""}"#,
        br#"{"text":"https://github.com/org/repo/tree/main/files/x"}"#,
        br#"{"profiles/x": "tiles/y"}"#,
        b"files/abc",
        b"",
    ] {
        assert!(
            names_in_body(body).is_empty(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // Inside a reference field, a name counts wherever it sits in the value.
    for (body, want) in [
        (
            &br#"{"fileName":"static/files/logo.png"}"#[..],
            "files/logo.png",
        ),
        (br#"{"fileUri":"projects/p/files/pf1"}"#, "files/pf1"),
        (br#"{"fileUri":"x/files/xf1"}"#, "files/xf1"),
        (
            br#"{"fileUri":"//generativelanguage.googleapis.com/v1beta/files/h1"}"#,
            "files/h1",
        ),
        (
            br#"{"fileUri":"generativelanguage.googleapis.com/v1beta/files/h2"}"#,
            "files/h2",
        ),
        (br#"{"model":"models/tunedModels/tm1"}"#, "tunedModels/tm1"),
        (br#"{"file":{"file_id":"files/oa1"}}"#, "files/oa1"),
        (br#"{"image_url":{"url":"files/oa2"}}"#, "files/oa2"),
    ] {
        assert_eq!(
            names_in_body(body),
            names(&[want]),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // A name before a dot segment counts too: a reader may not resolve it.
    let dotted = br#"{"fileUri":"files/victim/../mine"}"#;
    assert_eq!(
        names_in_body(dotted),
        names(&["files/mine", "files/victim"])
    );
    // A Gemini API URL counts wherever it is.
    let url = br#"{"text":"https://generativelanguage.googleapis.com/v1beta/files/u1"}"#;
    assert_eq!(names_in_body(url), names(&["files/u1"]));
    // A function's result may carry media by reference: that is read.
    let parts =
        br#"{"functionResponse":{"name":"f","parts":[{"fileData":{"fileUri":"files/fr1"}}]}}"#;
    assert_eq!(names_in_body(parts), names(&["files/fr1"]));
    let stores = br#"{"tools":[{"fileSearch":{"fileSearchStoreNames":["fileSearchStores/s1"]}}]}"#;
    assert_eq!(names_in_body(stores), names(&["fileSearchStores/s1"]));
}

#[test]
fn names_chosen_at_creation_and_made_along_the_way() {
    let upload = br#"{"file":{"name":"files/report-2026","displayName":"r"}}"#;
    assert_eq!(chosen_names(upload), names(&["files/report-2026"]));
    assert!(chosen_names(br#"{"file":{"displayName":"files/x"}}"#).is_empty());
    let video = br#"{"name":"models/veo/operations/op1","done":true,"response":{"generatedVideos":[{"video":{"uri":"https://generativelanguage.googleapis.com/v1beta/files/viwx:download?alt=media"}}]}}"#;
    assert!(names_in_answer(video).contains(&"files/viwx".to_string()));
    assert!(has_batch_input_file(
        br#"{"batch":{"input_config":{"file_name":"files/in"}}}"#
    ));
    assert!(!has_batch_input_file(
        br#"{"batch":{"inputConfig":{"requests":{"requests":[]}}}}"#
    ));
    let batch = br#"{"name":"batches/b1","output":{"responsesFile":"files/batch-out"},"displayName":"files/echoed","metadata":{"prompt":"files/smuggled"}}"#;
    assert_eq!(names_in_answer(batch), names(&["files/batch-out"]));
    let veo = br#"{"done":true,"response":{"generateVideoResponse":{"generatedSamples":[{"video":{"uri":"https://generativelanguage.googleapis.com/v1beta/files/v2:download?alt=media"}}]}}}"#;
    assert_eq!(names_in_answer(veo), names(&["files/v2"]));
    let wrapped = br#"{"name":"batches/b2","metadata":{"output":{"responsesFile":"files/out2"}},"response":{"responsesFile":"files/out2"}}"#;
    assert_eq!(names_in_answer(wrapped), names(&["files/out2"]));
    // What a request wrote comes back in its answer: never read as something Google made.
    let echoed = br#"{"name":"batches/b3","metadata":{"output":{"inlinedResponses":{"inlinedResponses":[{"metadata":{"uri":"files/smuggled"},"response":{"candidates":[{"content":{"parts":[{"text":"https://generativelanguage.googleapis.com/v1beta/files/said"}]}}]}}]}}}}"#;
    assert!(names_in_answer(echoed).is_empty());
}

#[test]
fn body_dedup_caps_and_long_ids() {
    let body: String = (0..150)
        .map(|i| format!(r#"{{"fileUri":"files/f{i}"}},{{"fileUri":"files/f{i}"}},"#))
        .collect();
    let found = names_in_body(body.as_bytes());
    assert_eq!(found.len(), MAX_NAMES + 1);
    assert_eq!(found[0], "files/f0");
    let long = format!(r#"{{"fileUri":"files/{}"}}"#, "a".repeat(1000));
    let found = names_in_body(long.as_bytes());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].len(), "files/".len() + MAX_ID_LEN + 1);
    assert_eq!(kind_of(&found[0]), None);
}

#[test]
fn body_large_with_name_at_end() {
    let mut body = Vec::with_capacity(5 << 20);
    body.extend_from_slice(br#"{"inlineData":{"data":""#);
    let filler = b"QUJDs/ab+/files/+9Xfiles";
    while body.len() < (5 << 20) {
        body.extend_from_slice(filler);
    }
    body.extend_from_slice(br#""}},{"fileData":{"fileUri":"files/last1"}}"#);
    assert_eq!(names_in_body(&body), names(&["files/last1"]));
}

#[test]
fn created_names_shapes() {
    let cache =
        br#"{"name":"cachedContents/abc123","model":"models/gemini-2.0-flash","expireTime":"x"}"#;
    assert_eq!(created_names(cache), names(&["cachedContents/abc123"]));
    let batch = br#"{"name":"batches/b42","metadata":{"@type":"type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"}}"#;
    assert_eq!(created_names(batch), names(&["batches/b42"]));
    let op = br#"{"name":"models/veo-2.0-generate-001/operations/op9"}"#;
    assert_eq!(created_names(op), names(&["operations/op9"]));
    let tuning = br#"{"name":"tunedModels/t7/operations/o1","metadata":{"totalSteps":10,"tunedModel":"tunedModels/t7"}}"#;
    assert_eq!(
        created_names(tuning),
        names(&["tunedModels/t7", "operations/o1"])
    );
    let upload = br#"{"file":{"name":"files/up1","mimeType":"video/mp4","sizeBytes":"12"}}"#;
    assert_eq!(created_names(upload), names(&["files/up1"]));
    assert!(created_names(b"not json").is_empty());
    assert!(created_names(br#"{"name":"files/x""#).is_empty());
    assert!(created_names(br#"{"name":"models/gemini-2.0-flash"}"#).is_empty());
    assert!(created_names(br#"{"name":42}"#).is_empty());
    assert!(created_names(br#"["files/x"]"#).is_empty());
    assert!(created_names(b"").is_empty());
    let deep = "[".repeat(100_000);
    assert!(created_names(deep.as_bytes()).is_empty());
}

#[test]
fn listings_are_filtered() {
    assert!(is_listing("/v1beta/files"));
    assert!(is_listing("/v1beta/files/"));
    assert!(is_listing("/v1beta/models/veo/operations?pageSize=3"));
    assert!(!is_listing("/v1beta/files/abc"));
    assert!(!is_listing("/v1beta/models"));
    let answer = br#"{"files":[{"name":"files/a"},{"name":"files/b"},{"mimeType":"x"}],"nextPageToken":"t"}"#;
    let kept = filter_listing(answer, |n| n == "files/a").unwrap();
    let kept: serde_json::Value = serde_json::from_slice(&kept).unwrap();
    assert_eq!(kept["files"], serde_json::json!([{"name": "files/a"}]));
    assert_eq!(kept["nextPageToken"], "t");
    assert!(filter_listing(b"[1]", |_| true).is_none());
    assert!(filter_listing(b"not json", |_| true).is_none());
}

#[test]
fn interactions_in_paths_and_bodies() {
    assert_eq!(
        kind_of("interactions/v1_ChdAb-c.9"),
        Some(Kind::Interaction)
    );
    assert_eq!(Kind::Interaction.ttl(), Duration::from_secs(60 * 24 * 3600));
    for (path, want) in [
        ("/v1beta/interactions/v1_abc", &["interactions/v1_abc"][..]),
        (
            "/v1beta/interactions/v1_abc/cancel",
            &["interactions/v1_abc"],
        ),
        (
            "/v1beta/interactions/v1_abc:cancel",
            &["interactions/v1_abc"],
        ),
        (
            "/v1beta/Interactions/v1_abc?stream=true",
            &["interactions/v1_abc"],
        ),
        ("/v1beta/interactions", &[]),
    ] {
        assert_eq!(names_in_path(path), names(want), "{path}");
    }
    assert!(is_listing("/v1beta/interactions"));

    // A follow-up names its parent by its bare id, in either spelling of the field.
    for (body, want) in [
        (
            &br#"{"model":"gemini-2.5-flash","input":"and then?","previous_interaction_id":"v1_abc"}"#[..],
            "interactions/v1_abc",
        ),
        (br#"{"previousInteractionId":"v1_def"}"#, "interactions/v1_def"),
        (br#"{"previous_interaction_id":"v1\u005fesc"}"#, "interactions/v1_esc"),
        (br#"{"previous_interaction_id":" v1_trim "}"#, "interactions/v1_trim"),
        // A full name, or a URL, is read as a reference.
        (br#"{"previous_interaction_id":"interactions/v1_full"}"#, "interactions/v1_full"),
        (
            br#"{"previous_interaction_id":"https://generativelanguage.googleapis.com/v1beta/interactions/v1_url"}"#,
            "interactions/v1_url",
        ),
        // An id is cut where an id cannot go on, as in a path.
        (br#"{"previous_interaction_id":"v1_cut?x=1"}"#, "interactions/v1_cut"),
        // Media by reference in an interaction's input.
        (
            br#"{"model":"m","input":[{"type":"text","text":"what is this?"},{"type":"image","uri":"files/img1","mime_type":"image/png"}]}"#,
            "files/img1",
        ),
        (br#"{"model":"m","cached_content":"cachedContents/c9"}"#, "cachedContents/c9"),
    ] {
        assert_eq!(
            names_in_body(body),
            names(&[want]),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let turns = br#"{"input":[{"role":"user","content":[{"type":"video","uri":"files/v1"}]}]}"#;
    assert_eq!(names_in_body(turns), names(&["files/v1"]));
    let both =
        br#"{"previous_interaction_id":"v1_p","input":[{"type":"document","uri":"files/d1"}]}"#;
    assert_eq!(
        names_in_body(both),
        names(&["interactions/v1_p", "files/d1"])
    );
    // An overlong id is kept one byte too long: it can match nothing bound.
    let long = format!(r#"{{"previous_interaction_id":"{}"}}"#, "a".repeat(1000));
    let found = names_in_body(long.as_bytes());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].len(), "interactions/".len() + MAX_ID_LEN + 1);
    assert_eq!(kind_of(&found[0]), None);
    // Not a reference: a function's arguments, text, an empty value, a `uri` outside an
    // interaction's input (a batch request's metadata is the client's own).
    for body in [
        &br#"{"functionCall":{"name":"resume","args":{"previous_interaction_id":"v1_x"}}}"#[..],
        br#"{"batch":{"inputConfig":{"requests":{"requests":[{"metadata":{"uri":"files/m1"}}]}}}}"#,
        br#"{"uri":"files/top"}"#,
        br#"{"input":"my previous_interaction_id was v1_x"}"#,
        br#"{"previous_interaction_id":""}"#,
    ] {
        assert!(
            names_in_body(body).is_empty(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn the_interaction_an_answer_creates() {
    let answer = br#"{"id":"v1_new","status":"completed","model":"gemini-2.5-flash","previous_interaction_id":"v1_old","outputs":[{"type":"function_call","id":"call_1","name":"f","arguments":{"id":"said"}}],"input":[{"id":"echoed"}]}"#;
    assert_eq!(
        created_interaction(answer, false).as_deref(),
        Some("interactions/v1_new")
    );
    // Outputs before the id do not count, wherever the id comes.
    let late = br#"{"outputs":[{"type":"function_call","id":"call_1"}],"id":"v1_late"}"#;
    assert_eq!(
        created_interaction(late, false).as_deref(),
        Some("interactions/v1_late")
    );
    for no in [
        &br#"{"outputs":[{"id":"call_1"}],"status":"completed"}"#[..],
        br#"{"id":"v1 with spaces"}"#,
        br#"{"id":"v1_cut"#,
        b"not json",
        b"",
    ] {
        assert_eq!(
            created_interaction(no, false),
            None,
            "{}",
            String::from_utf8_lossy(no)
        );
    }
    // A stream names it in its lifecycle events; steps' ids are theirs.
    let events = b"event: interaction.created\ndata: {\"event_type\":\"interaction.created\",\"interaction\":{\"id\":\"v1_s\",\"status\":\"in_progress\"}}\n\n";
    assert_eq!(
        created_interaction(events, true).as_deref(),
        Some("interactions/v1_s")
    );
    let step =
        b"data: {\"event_type\":\"step.start\",\"id\":\"x\",\"step\":{\"id\":\"call_2\"}}\n\n";
    assert_eq!(created_interaction(step, true), None);
}

#[test]
fn a_stream_names_its_interaction_as_soon_as_the_event_is_whole() {
    let first = b"event: interaction.created\r\ndata: {\"event_type\":\"interaction.created\",\"interaction\":{\"id\":\"v1_";
    let rest = b"str\",\"status\":\"in_progress\"}}\r\n\r\ndata: {\"event_type\":\"step.delta\",\"delta\":{\"type\":\"text\",\"text\":\"hi\"}}\r\n\r\n";
    let mut watch = InteractionWatch::new(true);
    let mut prefix = first.to_vec();
    assert_eq!(watch.read(&prefix, false), None);
    prefix.extend_from_slice(rest);
    assert_eq!(
        watch.read(&prefix, false).as_deref(),
        Some("interactions/v1_str")
    );
    // Said once.
    assert_eq!(watch.read(&prefix, false), None);
    assert_eq!(watch.read(&prefix, true), None);

    // A JSON answer is read once it is whole (an object cut short could mislead the path).
    let mut watch = InteractionWatch::new(false);
    let answer = br#"{"id":"v1_json","outputs":[]}"#;
    assert_eq!(watch.read(&answer[..10], false), None);
    assert_eq!(watch.read(answer, false), None);
    assert_eq!(
        watch.read(answer, true).as_deref(),
        Some("interactions/v1_json")
    );
    // The end of a stream reads what no blank line closed; an id cut off there is none.
    let mut watch = InteractionWatch::new(true);
    let cut = b"data: {\"interaction\":{\"id\":\"v1_cu";
    assert_eq!(watch.read(cut, false), None);
    assert_eq!(watch.read(cut, true), None);
    let mut watch = InteractionWatch::new(true);
    let unterminated = b"data: {\"interaction\":{\"id\":\"v1_end\"}}";
    assert_eq!(
        watch.read(unterminated, true).as_deref(),
        Some("interactions/v1_end")
    );
}
