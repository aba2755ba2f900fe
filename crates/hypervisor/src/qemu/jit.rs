//! TCG's translation statistics (`x-query-jit`): how many guest code blocks QEMU has
//! translated and how much host code it made for them. Under TCG a cold path costs about
//! its translation, so these counts measure guest work without the host's noise.

use serde_json::Value;

use super::Qemu;
use crate::{HypervisorError, Result, TranslationStats};

/// Longest `x-query-jit` text read; QEMU's is under 1 KiB.
const MAX_TEXT: usize = 16 * 1024;

impl Qemu {
    /// `x-query-jit`, parsed; `None` when the VM runs under KVM (nothing is translated).
    pub(super) async fn query_jit(&self) -> Result<Option<TranslationStats>> {
        let Some(reply) = self
            .qmp_if_present("x-query-jit", "only available with accel=tcg")
            .await?
        else {
            return Ok(None);
        };
        reply
            .get("human-readable-text")
            .and_then(Value::as_str)
            .and_then(parse)
            .map(Some)
            .ok_or_else(|| HypervisorError::Qmp {
                command: "x-query-jit".into(),
                message: "no translation block count in the reply".into(),
            })
    }
}

/// The counts in QEMU's report (QEMU 7.2's layout: `TB count  N`, `gen code size
/// USED/SIZE`, `TB flush count  N`); `None` without a block count.
pub fn parse(text: &str) -> Option<TranslationStats> {
    let text = text.get(..MAX_TEXT).unwrap_or(text);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
    };
    let number = |token: &str| token.parse::<u64>().ok();
    Some(TranslationStats {
        blocks: field("TB count").and_then(number)?,
        code_bytes: field("gen code size")
            .and_then(|used| used.split('/').next())
            .and_then(number)
            .unwrap_or(0),
        flushes: field("TB flush count").and_then(number).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_7_2s_report() {
        let text = "Translation buffer state:\ngen code size       30488803/33472512\n\
            TB count            57097\nTB avg target size  14 max=1503 bytes\n\
            TB avg host size    293 bytes (expansion ratio: 19.7)\n\nStatistics:\n\
            TB flush count      2\nTB invalidate count 240\n[TCG profiler not compiled]\n";
        assert_eq!(
            parse(text),
            Some(TranslationStats {
                blocks: 57097,
                code_bytes: 30488803,
                flushes: 2,
            })
        );
    }

    #[test]
    fn a_report_without_a_block_count_is_refused() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("TB count  many\n"), None);
        assert_eq!(parse(&"x".repeat(100_000)), None);
        // Only the block count is needed.
        assert_eq!(
            parse("TB count 3"),
            Some(TranslationStats {
                blocks: 3,
                code_bytes: 0,
                flushes: 0
            })
        );
    }
}
