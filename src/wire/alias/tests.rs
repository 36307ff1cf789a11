use super::*;

fn aliases() -> BTreeMap<String, String> {
    BTreeMap::from([("gemini-pro-chat".to_string(), "gemini-2.5-pro".to_string())])
}

#[test]
fn an_alias_in_the_path_names_the_real_model() {
    let path = "/v1beta/models/gemini-pro-chat:streamGenerateContent";
    let got = resolve(&aliases(), Api::Gemini, path, "gemini-pro-chat", b"{}")
        .unwrap()
        .unwrap();
    assert_eq!(got.model, "gemini-2.5-pro");
    assert_eq!(
        got.path,
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
    );
    assert_eq!(got.body, None);
    // A model that is no alias, and a path that only starts like one, stay as they are.
    let real = "/v1beta/models/gemini-2.5-pro:generateContent";
    assert_eq!(
        resolve(&aliases(), Api::Gemini, real, "gemini-2.5-pro", b"").unwrap(),
        None
    );
    assert_eq!(
        rewrite_path("/v1beta/models/gemini-pro-chatty:x", "gemini-pro-chat", "m"),
        None
    );
    assert_eq!(
        rewrite_path("/v1/models/gemini-pro-chat", "gemini-pro-chat", "m").as_deref(),
        Some("/v1/models/m")
    );
}

#[test]
fn an_openai_body_changes_in_its_model_value_only() {
    let body = br#"{ "messages" : [{"role":"user","content":"model: gemini-pro-chat"}],
  "model":"gemini-pro-chat" ,"stream":true}"#;
    let path = "/v1beta/openai/chat/completions";
    let got = resolve(&aliases(), Api::OpenAi, path, "gemini-pro-chat", body)
        .unwrap()
        .unwrap();
    assert_eq!(got.path, path);
    assert_eq!(
        String::from_utf8(got.body.unwrap()).unwrap(),
        r#"{ "messages" : [{"role":"user","content":"model: gemini-pro-chat"}],
  "model":"gemini-2.5-pro" ,"stream":true}"#
    );
    // `models/` stays as written; an escaped key is the same key.
    let escaped = br#"{"\u006dodel":"models/gemini-pro-chat"}"#;
    assert_eq!(
        rewrite_body_model(escaped, "gemini-pro-chat", "gemini-2.5-pro").unwrap(),
        br#"{"\u006dodel":"models/gemini-2.5-pro"}"#
    );
    // A `model` below the top level is not the request's.
    let nested = br#"{"tools":{"model":"gemini-pro-chat"},"model":"x"}"#;
    assert_eq!(rewrite_body_model(nested, "gemini-pro-chat", "y"), None);
}

#[test]
fn a_native_body_naming_the_alias_changes_with_its_path() {
    // A cache names its model in the body; a native body may repeat the path's.
    let body = br#"{"model":"models/gemini-pro-chat","contents":[]}"#;
    let got = resolve(
        &aliases(),
        Api::Gemini,
        "/v1beta/cachedContents",
        "gemini-pro-chat",
        body,
    )
    .unwrap()
    .unwrap();
    assert_eq!(got.path, "/v1beta/cachedContents");
    assert_eq!(
        got.body.unwrap(),
        br#"{"model":"models/gemini-2.5-pro","contents":[]}"#
    );
    // A tuned model's `baseModel` is not rewritten: refused rather than sent as it is.
    let tuned = br#"{"baseModel":"models/gemini-pro-chat"}"#;
    let e = resolve(
        &aliases(),
        Api::Gemini,
        "/v1beta/tunedModels",
        "gemini-pro-chat",
        tuned,
    )
    .unwrap_err();
    assert!(e.contains("gemini-2.5-pro"), "{e}");
}

#[test]
fn an_openai_model_lookup_names_the_alias_in_its_path() {
    let got = resolve(
        &aliases(),
        Api::OpenAi,
        "/v1beta/openai/models/gemini-pro-chat",
        "",
        b"",
    )
    .unwrap()
    .unwrap();
    assert_eq!(got.model, "gemini-2.5-pro");
    assert_eq!(got.path, "/v1beta/openai/models/gemini-2.5-pro");
    assert_eq!(
        resolve(&aliases(), Api::OpenAi, "/v1beta/openai/models", "", b"").unwrap(),
        None
    );
}

#[test]
fn listings_get_the_aliases_saying_what_they_stand_for() {
    assert!(is_model_listing("/v1beta/models"));
    assert!(is_model_listing("/v1/models/"));
    assert!(is_model_listing("/v1beta/openai/models"));
    assert!(!is_model_listing("/v1beta/models/gemini-2.5-pro"));
    assert!(!is_model_listing("/v1beta/tunedModels"));

    let native = br#"{"models":[{"name":"models/gemini-2.5-pro","displayName":"Gemini 2.5 Pro","supportedGenerationMethods":["generateContent"]}],"nextPageToken":"t"}"#;
    let aliases = [("gemini-pro-chat", "gemini-2.5-pro"), ("old", "gemini-1.0")];
    let out: Value = serde_json::from_slice(&add_to_listing(native, &aliases).unwrap()).unwrap();
    let models = out["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    assert_eq!(models[1]["name"], "models/gemini-pro-chat");
    assert_eq!(models[1]["baseModelId"], "gemini-2.5-pro");
    assert_eq!(
        models[1]["description"],
        "keygate alias of models/gemini-2.5-pro"
    );
    assert_eq!(
        models[1]["supportedGenerationMethods"][0],
        "generateContent"
    );
    assert_eq!(models[2]["name"], "models/old");
    assert_eq!(out["nextPageToken"], "t");

    let openai = br#"{"object":"list","data":[{"id":"models/gemini-2.5-pro","object":"model","owned_by":"google"}]}"#;
    let out: Value =
        serde_json::from_slice(&add_to_listing(openai, &aliases[..1]).unwrap()).unwrap();
    assert_eq!(out["data"][1]["id"], "models/gemini-pro-chat");
    assert_eq!(out["data"][1]["alias_of"], "models/gemini-2.5-pro");
    assert_eq!(out["data"][1]["object"], "model");
    assert_eq!(add_to_listing(b"[1]", &aliases), None);
    assert_eq!(add_to_listing(br#"{"other":[]}"#, &aliases), None);
}

proptest::proptest! {
    /// Whatever else a body holds, its rewrite is the same JSON with the top-level `model`
    /// naming the real model, and nothing else changed.
    #[test]
    fn the_rewrite_changes_the_top_level_model_only(
        before in proptest::collection::vec(("[a-z\\\\\"]{1,8}", "\\PC{0,12}"), 0..4),
        after in proptest::collection::vec(("[a-z\\\\\"]{1,8}", "\\PC{0,12}"), 0..4),
        nested_model in proptest::bool::ANY,
        prefix in proptest::bool::ANY,
    ) {
        let mut text = String::from("{");
        for (k, v) in &before {
            text.push_str(&format!("{}:{},", json!(format!("x{k}")), json!(v)));
        }
        if nested_model {
            text.push_str(r#""inner":{"model":"gemini-pro-chat"},"#);
        }
        let named = if prefix { "models/gemini-pro-chat" } else { "gemini-pro-chat" };
        text.push_str(&format!(r#""model" : "{named}""#));
        for (k, v) in &after {
            text.push_str(&format!(",{}:{}", json!(format!("y{k}")), json!(v)));
        }
        text.push('}');
        let out = rewrite_body_model(text.as_bytes(), "gemini-pro-chat", "gemini-2.5-pro").unwrap();
        let mut want: Value = serde_json::from_str(&text).unwrap();
        let real = if prefix { "models/gemini-2.5-pro" } else { "gemini-2.5-pro" };
        want["model"] = json!(real);
        let got: Value = serde_json::from_slice(&out).unwrap();
        proptest::prop_assert_eq!(got, want);
        // Byte for byte, only the model's string differs.
        let text_out = String::from_utf8(out).unwrap();
        proptest::prop_assert_eq!(
            text_out,
            text.replace(&format!(r#""model" : "{named}""#), &format!(r#""model" : "{real}""#))
        );
    }
}
