//! The HTTP/2 frame rewriter on a client port (`server::authority`): whatever bytes a client
//! sends, it must neither panic nor hold more than the listener's frame and header-list limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_node::server::authority::AuthorityFix;
use tokio::io::AsyncReadExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        // Starts as a client would, then goes wherever the input takes it.
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend_from_slice(data);
        let mut fix = AuthorityFix::new(&input[..]);
        let mut out = Vec::new();
        // An error is a fine answer to bad input; a panic is not.
        let _ = fix.read_to_end(&mut out).await;
    });
});
