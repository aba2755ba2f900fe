use loona_hpack::decoder::Decoder;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// The first header block grpcio 1.85 (gRPC C-core 58) sent for a `Status` call on
/// `unix:///tmp/authcap/py.sock`, captured on a raw socket: `:authority` is
/// `tmp%2Fauthcap%2Fpy.sock`, every field a literal with incremental indexing.
const GRPCIO_BLOCK: &str = "40053a706174681a2f63616368652e4361636865536572766963652f5374617475\
    73400a3a617574686f7269747917746d702532466175746863617025324670792e736f636b8386400c636f6e74\
    656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c6572734014677270632d\
    6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a6970400c67727063\
    2d74696d656f7574023553400a757365722d6167656e7430677270632d707974686f6e2f312e38352e3120677270\
    632d632f35382e302e3020286c696e75783b2063687474703229";

/// The header block @grpc/grpc-js 1.14 sent for the same call (Huffman-coded,
/// `:authority: localhost`).
const GRPC_JS_BLOCK: &str = "4186a0e41d139d09830493608324e55ef0c9397716cee62158dc91a6d47f8640\
    8e9acac8b0c842d6958b510f21aa9b903485a9264fafa90b2d03497ea6f66aff50863485a9264faf40899acac8\
    b24d494f6a7f8413ef0a9f7a8e9acac8b54790ab7443015c2d2eef5f8b1d75d0620d263d4c4d6564400274658\
    64d833505b11f";

/// An empty SETTINGS frame.
const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame_header(payload.len(), kind, flags, stream, &mut out);
    out.extend_from_slice(payload);
    out
}

/// A field as C-core encodes it: literal with incremental indexing, new name.
fn indexed_literal(name: &str, value: &str, out: &mut Vec<u8>) {
    out.push(0x40);
    for string in [name, value] {
        encode_integer(string.len(), 7, 0, out);
        out.extend_from_slice(string.as_bytes());
    }
}

fn request_block(authority: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    indexed_literal(":path", "/cache.CacheService/Status", &mut block);
    indexed_literal(":authority", authority, &mut block);
    indexed_literal("content-type", "application/grpc", &mut block);
    indexed_literal("te", "trailers", &mut block);
    block
}

fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend_from_slice(&SETTINGS);
    for frame in frames {
        bytes.extend_from_slice(frame);
    }
    bytes
}

fn filter_all(input: &[u8]) -> Result<Vec<u8>, AuthorityError> {
    let mut out = Vec::new();
    AuthorityFilter::new().feed(input, &mut out)?;
    Ok(out)
}

/// A frame as the server sees it.
#[derive(Debug, PartialEq)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Splits the server's input into the preface and its frames.
fn frames_of(bytes: &[u8]) -> Vec<Frame> {
    assert_eq!(&bytes[..PREFACE.len()], PREFACE);
    let mut rest = &bytes[PREFACE.len()..];
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        frames.push(Frame {
            kind: rest[3],
            flags: rest[4],
            stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
            payload: rest[9..9 + length].to_vec(),
        });
        rest = &rest[9 + length..];
    }
    frames
}

/// The header lists the server decodes from its input (padding-free frames).
fn header_lists(frames: &[Frame], decoder: &mut Decoder<'_>) -> Vec<Vec<(String, String)>> {
    let mut lists = Vec::new();
    let mut block = Vec::new();
    for frame in frames {
        match frame.kind {
            HEADERS => {
                let skip = if frame.flags & PRIORITY != 0 { 5 } else { 0 };
                assert_eq!(frame.flags & PADDED, 0);
                block.extend_from_slice(&frame.payload[skip..]);
            }
            CONTINUATION => block.extend_from_slice(&frame.payload),
            _ => continue,
        }
        assert!(frame.payload.len() <= MAX_FRAME_PAYLOAD);
        if frame.flags & END_HEADERS != 0 {
            let list = decoder
                .decode(&block)
                .expect("the server decodes the block");
            lists.push(
                list.into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8(n).expect("name"),
                            String::from_utf8(v).expect("value"),
                        )
                    })
                    .collect(),
            );
            block.clear();
        }
    }
    lists
}

fn authority_of(list: &[(String, String)]) -> &str {
    list.iter()
        .find(|(name, _)| name == ":authority")
        .map(|(_, value)| value.as_str())
        .expect(":authority")
}

#[test]
fn malformed_authorities_are_replaced_with_localhost() {
    for authority in [
        "%2Ftmp%2Fx.sock",
        "tmp%2Fx.sock",
        "/tmp/x.sock",
        "unix:/tmp/x.sock",
    ] {
        assert!(
            http::uri::Authority::try_from(authority).is_err(),
            "{authority}"
        );
        let block = request_block(authority);
        let input = connection(&[frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)]);
        let output = filter_all(&input).expect("filter");
        let frames = frames_of(&output);
        assert_eq!(frames[0].payload, b"", "SETTINGS passes through");
        assert_eq!(frames[1].flags, END_HEADERS | END_STREAM);
        let lists = header_lists(&frames, &mut Decoder::new());
        let mut expected = Decoder::new().decode(&block).expect("decode");
        expected[3].1 = b"localhost".to_vec();
        assert_eq!(lists.len(), 1);
        assert_eq!(authority_of(&lists[0]), "localhost", "{authority}");
        let expected: Vec<_> = expected
            .into_iter()
            .map(|(n, v)| {
                (
                    String::from_utf8(n).expect("n"),
                    String::from_utf8(v).expect("v"),
                )
            })
            .collect();
        assert_eq!(lists[0], expected);
    }
}

#[test]
fn what_grpcio_sends_is_fixed_and_what_grpc_js_sends_is_left_alone() {
    let input = connection(&[frame(HEADERS, END_HEADERS, 1, &unhex(GRPCIO_BLOCK))]);
    let lists = header_lists(
        &frames_of(&filter_all(&input).expect("filter")),
        &mut Decoder::new(),
    );
    assert_eq!(authority_of(&lists[0]), "localhost");
    assert!(lists[0].contains(&(":path".into(), "/cache.CacheService/Status".into())));

    let input = connection(&[frame(HEADERS, END_HEADERS, 1, &unhex(GRPC_JS_BLOCK))]);
    assert_eq!(filter_all(&input).expect("filter"), input);
}

#[test]
fn valid_authorities_pass_byte_identical() {
    for authority in ["localhost", "vmcache", "localhost:50051", "[::1]:1"] {
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &request_block(authority)),
            frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"),
            frame(HEADERS, END_HEADERS, 3, &[0xbe, 0xbf, 0x83, 0x86]),
        ]);
        assert_eq!(filter_all(&input).expect("filter"), input, "{authority}");
    }
}

#[test]
fn frames_split_across_reads_give_the_same_output() {
    let input = connection(&[
        frame(HEADERS, END_HEADERS, 1, &request_block("/tmp/x.sock")),
        frame(0x0, END_STREAM, 1, b"\0\0\0\0\x05hello"),
    ]);
    let whole = filter_all(&input).expect("filter");
    for chunk in [1, 2, 7, 9, 10, 33] {
        let mut filter = AuthorityFilter::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            filter.feed(piece, &mut out).expect("feed");
        }
        assert_eq!(out, whole, "chunks of {chunk}");
    }
}

#[test]
fn continuation_padding_and_priority_are_handled() {
    let block = request_block("%2Ftmp%2Fx.sock");
    let (head, tail) = block.split_at(20);
    let mut payload = vec![3]; // pad length
    payload.extend_from_slice(&[0x80, 0, 0, 0, 15]); // exclusive dependency on 0, weight 16
    payload.extend_from_slice(head);
    payload.extend_from_slice(&[0, 0, 0]);
    let input = connection(&[
        frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload),
        frame(CONTINUATION, 0, 5, &tail[..5]),
        frame(CONTINUATION, END_HEADERS, 5, &tail[5..]),
    ]);
    let frames = frames_of(&filter_all(&input).expect("filter"));
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[1].flags, PRIORITY | END_STREAM | END_HEADERS);
    assert_eq!(frames[1].stream, 5);
    assert_eq!(&frames[1].payload[..5], &[0x80, 0, 0, 0, 15]);
    let lists = header_lists(&frames, &mut Decoder::new());
    assert_eq!(authority_of(&lists[0]), "localhost");
    assert_eq!(lists[0].len(), 6);

    // The same with a valid authority goes on as received, padding and all.
    let block = request_block("localhost");
    let (head, tail) = block.split_at(20);
    let mut payload = vec![2];
    payload.extend_from_slice(head);
    payload.extend_from_slice(&[0, 0]);
    let input = connection(&[
        frame(HEADERS, PADDED, 7, &payload),
        frame(CONTINUATION, END_HEADERS, 7, tail),
    ]);
    assert_eq!(filter_all(&input).expect("filter"), input);
}

#[test]
fn later_blocks_are_decoded_with_the_clients_dynamic_table() {
    // The second request refers to the first one's fields by dynamic index, as C-core
    // does: 0xbe..0xc1 are the four literals of the first block, newest first.
    let input = connection(&[
        frame(HEADERS, END_HEADERS, 1, &request_block("tmp%2Fx.sock")),
        frame(
            HEADERS,
            END_HEADERS,
            3,
            &[0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe],
        ),
    ]);
    let mut server = Decoder::new();
    let lists = header_lists(
        &frames_of(&filter_all(&input).expect("filter")),
        &mut server,
    );
    assert_eq!(lists.len(), 2);
    assert_eq!(authority_of(&lists[1]), "localhost");
    assert_eq!(lists[0], lists[1]);
}

#[test]
fn a_block_larger_than_a_frame_is_split_into_continuations() {
    let mut block = request_block("/tmp/x.sock");
    indexed_literal("x-large", &"v".repeat(40_000), &mut block);
    let mut input = PREFACE.to_vec();
    // The client may send frames up to the server's SETTINGS_MAX_FRAME_SIZE.
    input.extend(frame(HEADERS, 0, 1, &block[..30_000]));
    input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[30_000..]));
    let frames = frames_of(&filter_all(&input).expect("filter"));
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0].kind, HEADERS);
    assert!(frames[1..].iter().all(|frame| frame.kind == CONTINUATION));
    let lists = header_lists(&frames, &mut Decoder::new());
    assert_eq!(authority_of(&lists[0]), "localhost");
    assert_eq!(lists[0][6].1.len(), 40_000);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let valid = frame(HEADERS, END_HEADERS, 1, &request_block("localhost"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("HTTP/1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "lone CONTINUATION",
            connection(&[frame(CONTINUATION, END_HEADERS, 1, &[0x82])]),
        ),
        (
            "DATA inside a block",
            connection(&[frame(HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, b"x")]),
        ),
        (
            "CONTINUATION of another stream",
            connection(&[
                frame(HEADERS, 0, 1, &[0x82]),
                frame(CONTINUATION, END_HEADERS, 3, &[]),
            ]),
        ),
        (
            "padding longer than the frame",
            connection(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82])]),
        ),
        (
            "empty padded frame",
            connection(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[])]),
        ),
        (
            "short priority",
            connection(&[frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0])]),
        ),
        (
            "index out of range",
            connection(&[frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f])]),
        ),
        (
            "truncated literal",
            connection(&[frame(HEADERS, END_HEADERS, 1, &[0x40, 0x7f])]),
        ),
        (
            "table size above the limit",
            connection(&[frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x7f, 0x82])]),
        ),
        ("huge block", {
            let mut input = connection(&[frame(HEADERS, 0, 1, &[0x82])]);
            for _ in 0..5 {
                input.extend(frame(CONTINUATION, 0, 1, &[0u8; 16_000]));
            }
            input
        }),
        (
            "huge frame",
            connection(&[frame(HEADERS, END_HEADERS, 1, &vec![0u8; MAX_HEADER_BLOCK])]),
        ),
        ("huge list", {
            // 4000-byte dynamic entry referenced 20 times: a small block, a big list.
            let mut block = Vec::new();
            indexed_literal("x", &"v".repeat(4_000), &mut block);
            block.extend(std::iter::repeat(0xbe).take(20));
            connection(&[frame(HEADERS, END_HEADERS, 1, &block)])
        }),
    ];
    for (what, input) in cases {
        assert!(filter_all(&input).is_err(), "{what} was accepted");
    }
    assert!(filter_all(&connection(&[valid])).is_ok());

    // Random bytes after a valid start: errors or output, never a panic.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2_000 {
        let mut input = connection(&[]);
        let len = rng.gen_range(0..300);
        input.extend((0..len).map(|_| rng.gen::<u8>()));
        let _ = filter_all(&input);
        let mut block = request_block("/x");
        for byte in block.iter_mut() {
            if rng.gen_ratio(1, 10) {
                *byte = rng.gen();
            }
        }
        let _ = filter_all(&connection(&[frame(HEADERS, END_HEADERS, 1, &block)]));
    }
}

#[tokio::test]
async fn the_stream_filters_reads_and_passes_writes() {
    let (client, server) = tokio::io::duplex(64);
    let mut server = AuthorityFilterStream::new(server);
    let mut client = client;
    let input = connection(&[frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block("/tmp/x.sock"),
    )]);
    let expected = filter_all(&input).expect("filter");
    let writer = tokio::spawn(async move {
        client.write_all(&input).await.expect("write");
        client.write_all(b"").await.expect("write");
        let mut answer = [0u8; 5];
        client.read_exact(&mut answer).await.expect("read answer");
        assert_eq!(&answer, b"hello");
    });
    let mut received = vec![0u8; expected.len()];
    server.read_exact(&mut received).await.expect("read");
    assert_eq!(received, expected);
    server.write_all(b"hello").await.expect("answer");
    writer.await.expect("client");

    let (mut client, server) = tokio::io::duplex(64);
    let mut server = AuthorityFilterStream::new(server);
    client
        .write_all(b"GET / HTTP/1.1\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 16];
    let err = server.read(&mut buf).await.expect_err("refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}
