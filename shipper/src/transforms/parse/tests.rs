use super::tape::TapeParser;
use super::*;

fn json(line: &[u8]) -> Result<Option<Vec<u8>>, Failure> {
    Parser::default().extract(line, Format::Json, "service").map(|f| f.key.map(<[u8]>::to_vec))
}

#[test]
fn extracts_key_and_format() {
    let mut p = Parser::default();
    let f = p.extract(br#"{"service":"nginx","msg":"a\"b"}"#, Format::Json, "service");
    assert_eq!(f, Ok(Fields { key: Some(b"nginx"), format: None }));
    let f = p.extract(br#"{"msg":"x"}"#, Format::Json, "service");
    assert_eq!(f, Ok(Fields { key: None, format: None }));
    let f = p.extract(
        br#"{"format":"dns","dns":{"q":"a"},"service":"s\u00e9"}"#,
        Format::Cfjs1,
        "service",
    );
    assert_eq!(f, Ok(Fields { key: Some("sé".as_bytes()), format: Some(b"dns") }));
    let f = p.extract(br#"{"service":7}"#, Format::Json, "service");
    assert_eq!(f, Ok(Fields { key: None, format: None }));
}

#[test]
fn classifies_failures() {
    let mut p = Parser::default();
    assert_eq!(p.extract(b"{\"a\":", Format::Json, "service"), Err(Failure::Json));
    assert_eq!(p.extract(b"{\"a\":\"\xff\"}", Format::Json, "service"), Err(Failure::Utf8));
    assert_eq!(p.extract(b"[1,2]", Format::Json, "service"), Err(Failure::NotObject));
    assert_eq!(p.extract(b"plain text", Format::Json, "service"), Err(Failure::Json));
    assert_eq!(p.extract(br#"{"a":1}"#, Format::Cfjs1, "service"), Err(Failure::NoFormat));
    assert_eq!(
        p.extract(b"\xff anything", Format::Text, "service"),
        Ok(Fields { key: None, format: None })
    );
    // Invalid UTF-8 is reported as such even where the JSON is broken too, before or after
    // it, and wherever it is: a nested string, a member name, outside any string.
    let utf8: &[&[u8]] = &[
        b"{\"a\":\xc3",
        b"{\"a\" 1, \"b\":\"\xff\"}",
        b"{\"a\":{\"b\":[\"ok\xc3\xa9\", \"\xc3\"]}}",
        b"{\"\xc0\xaf\":1}",
        b"{\"a\":\"\xed\xa0\x80\"}",
        b"{\"a\":\"\xf0\x9f\x98\"}",
        b"{\"a\":1\xff}",
        b"\xef\xbb\xbf{\xff}",
    ];
    for line in utf8 {
        let got = p.extract(line, Format::Json, "service");
        assert_eq!(got, Err(Failure::Utf8), "{}", String::from_utf8_lossy(line));
    }
    // Valid UTF-8 outside a string is invalid JSON (a byte order mark, a bare word).
    assert_eq!(p.extract("\u{feff}{}".as_bytes(), Format::Json, "service"), Err(Failure::Json));
    assert_eq!(p.extract("{\"a\":é}".as_bytes(), Format::Json, "service"), Err(Failure::Json));
}

#[test]
fn the_first_string_member_of_the_name_is_the_key() {
    let first = br#"{"service":1,"service":"b","service":"c"}"#;
    assert_eq!(json(first), Ok(Some(b"b".to_vec())));
    // Nested members of the same name are not the key.
    assert_eq!(json(br#"{"x":{"service":"inner"},"y":["service"]}"#), Ok(None));
    // A name with escapes is compared unescaped; a value with escapes is unescaped.
    assert_eq!(json(br#"{"serv\u0069ce":"a\/b\\c\n\t"}"#), Ok(Some(b"a/b\\c\n\t".to_vec())));
    assert_eq!(json(br#"{"service":"\ud83d\ude00"}"#), Ok(Some("😀".as_bytes().to_vec())));
    // Lone surrogates are valid JSON and come out as U+FFFD.
    assert_eq!(json(br#"{"service":"a\ud800b\udc00"}"#), Ok(Some("a\u{fffd}b\u{fffd}".into())));
    assert_eq!(json(br#"{"service":""}"#), Ok(Some(Vec::new())));
    // The key field may be cfjs1's `format` itself: the first string is the key, the next
    // the format.
    let mut p = Parser::default();
    let f = p.extract(br#"{"format":"a","format":"b"}"#, Format::Cfjs1, "format");
    assert_eq!(f, Ok(Fields { key: Some(b"a"), format: Some(b"b") }));
}

#[test]
fn checks_the_grammar_of_the_whole_line() {
    let valid: &[&[u8]] = &[
        b"{}",
        b" \t{ } \r\n",
        br#"{"a":[],"b":{},"c":[[]],"d":[{}],"e":[1,-0,0.5,-1.25e+10,2E-3,1e400]}"#,
        br#"{"a":true,"b":false,"c":null,"d":"\"\\\/\b\f\n\r\t\u00FF","e":[ "x" , 1 ]}"#,
        br#"{"a":{"b":{"c":{"d":[1,[2,[3,{"e":"f"}]]]}}}}"#,
        "{\"é\":\"ü ☃ 😀\"}".as_bytes(),
    ];
    for line in valid {
        assert_eq!(json(line), Ok(None), "{}", String::from_utf8_lossy(line));
    }
    let invalid: &[&[u8]] = &[
        b"",
        b"{",
        b"{}}",
        b"{} x",
        b"{,}",
        b"{\"a\"}",
        b"{\"a\":}",
        b"{\"a\":1,}",
        b"{\"a\":[1,]}",
        b"{\"a\":[1 2]}",
        b"{\"a\":01}",
        b"{\"a\":1.}",
        b"{\"a\":.5}",
        b"{\"a\":-}",
        b"{\"a\":1e}",
        b"{\"a\":+1}",
        b"{\"a\":tru}",
        b"{\"a\":truee}",
        b"{\"a\":nul}",
        b"{\"a\":\"\\x\"}",
        b"{\"a\":\"\\u12G4\"}",
        b"{\"a\":\"\\u12\"}",
        b"{\"a\":\"tab\there\"}",
        b"{\"a\":\"open}",
        b"{\"a\":[}",
        b"{\"a\":{]}",
        b"{'a':1}",
        b"{a:1}",
        b"{\"a\":1}\x00",
        b"{\"a\":NaN}",
    ];
    for line in invalid {
        assert_eq!(json(line), Err(Failure::Json), "{}", String::from_utf8_lossy(line));
    }
    for line in [&b"[]"[..], b"1", b"\"s\"", b" null ", b"[{\"service\":\"a\"}]"] {
        assert_eq!(json(line), Err(Failure::NotObject), "{}", String::from_utf8_lossy(line));
    }
}

#[test]
fn deep_nesting_costs_no_recursion() {
    // Regression guard: a million open brackets must not overflow the stack.
    let depth = 1_000_000;
    let mut line = b"{\"a\":".to_vec();
    line.extend(std::iter::repeat_n(b'[', depth));
    line.extend(std::iter::repeat_n(b']', depth));
    line.push(b'}');
    assert_eq!(json(&line), Ok(None));
    line.pop();
    assert_eq!(json(&line), Err(Failure::Json));
}

#[test]
fn agrees_with_the_tape_parser_on_lines_as_applications_write_them() {
    let lines: &[&[u8]] = &[
        br#"{"ts":"2026-11-21T12:00:00.418602Z","level":"info","service":"svc-00","host":"edge-2.ams","msg":"GET /api/v1/users/0 200 in 143ms","req":{"id":"ef5fad15eced2fba","ua":"Go-http-client/2.0","bytes":73802},"trace":"8c5844efd12ab7ee80fd5a5fbb4ef804","note":"cache miss "}"#,
        br#"{"ts":"x","service":"svc-03","format":"waf_event","waf_event":{"colo":"ams1","seq":4,"bytes":7,"cache":{"status":"hit","age":12}},"note":""}"#,
        br#"{"service":"caf\u00e9","x":[1,2,{"service":"inner"}],"y":-1.5e-3}"#,
        br#"["service","not an object"]"#,
        br#"{"service":"\ud83d\ude00","m":"ok"}"#,
        br#"{"a":"b" "c":1}"#,
        b"{\"service\":\"a\xc3\xa9\"}",
        b"{\"service\":\"a\xc3\"}",
        br#"{"msg":"x","service":"web"} trailing"#,
        // The cases of the first two tests, which the tape parser once had as its own.
        br#"{"service":"nginx","msg":"a\"b"}"#,
        br#"{"msg":"x"}"#,
        br#"{"format":"dns","dns":{"q":"a"},"service":"s\u00e9"}"#,
        br#"{"service":7}"#,
        b"{\"a\":",
        b"{\"a\":\"\xff\"}",
        b"[1,2]",
        b"plain text",
        br#"{"a":1}"#,
        b"\xff anything",
    ];
    let (mut new, mut old) = (Parser::default(), TapeParser::default());
    for line in lines {
        for format in [Format::Json, Format::Cfjs1, Format::Text] {
            let a = new.extract(line, format, "service");
            let b = old.extract(line, format, "service");
            assert_eq!(a, b, "{} as {format:?}", String::from_utf8_lossy(line));
        }
    }
}
