//! Wire constants of the NBD protocol (`doc/proto.md` of the NBD project)
//! and the errno mapping QEMU's server uses.
//!
//! Everything on the wire is big-endian. The constants are public so that
//! tests and an NBD client can share them.

use std::io;

/// First eight bytes of every newstyle greeting (`"NBDMAGIC"`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle greeting magic, also the magic of every option request (`"IHAVEOPT"`).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: do not send the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: enter transmission on the named export (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission on it.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export (answer to `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply: one `NBD_INFO_*` item.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: the client must request `NBD_INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Option error: extended headers are in use and required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Info item: the export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational media.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one consistent export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_RESIZE` is supported.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Transmission flag: `NBD_CMD_BLOCK_STATUS` accepts a payload.
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status with one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes rather than write slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Reply flag: last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status extents (32-bit).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: block status extents (64-bit, extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` state bit: the range is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state bit: the range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD error: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Largest payload the server accepts or sends (QEMU's `NBD_MAX_BUFFER_SIZE`).
pub const MAX_BUFFER_SIZE: u32 = 32 << 20;
/// Longest export name, description or context name (`NBD_MAX_STRING_SIZE`).
pub const MAX_STRING_SIZE: usize = 4096;
/// Most extents in one block status chunk (QEMU: 1 MiB of 32-bit extents).
pub const MAX_BLOCK_STATUS_EXTENTS: usize = (1 << 20) / 8;

/// Metadata context id of `base:allocation` (QEMU's numbering).
pub const META_ID_BASE_ALLOCATION: u32 = 0;
/// Metadata context id of `qemu:allocation-depth` (QEMU's numbering).
pub const META_ID_ALLOCATION_DEPTH: u32 = 1;
/// Metadata context id of the first `qemu:dirty-bitmap:NAME`; the
/// export's i-th bitmap has this plus i (QEMU's numbering).
pub const META_ID_DIRTY_BITMAP: u32 = 2;
/// Most dirty bitmaps one export offers (a request's selection is a
/// 64-bit mask).
pub const MAX_EXPORT_BITMAPS: usize = 64;
/// Prefix of the dirty bitmap contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// Block status flag of a dirty extent in a dirty bitmap context.
pub const STATE_DIRTY: u32 = 1;

/// Maps a host errno to an NBD error as QEMU's `system_errno_to_nbd_errno`
/// does: the errors NBD knows pass through, `EROFS` becomes `EPERM`,
/// `EDQUOT`/`EFBIG` become `ENOSPC`, and everything else `EINVAL`.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        // EOPNOTSUPP is the same number on Linux.
        e if e == libc::ENOTSUP || e == libc::EOPNOTSUPP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EINVAL,
    }
}

/// Maps an I/O error to an NBD error: by its errno when it carries one
/// ([`errno_to_nbd`]), else by its kind (`EIO` for kinds without a match).
pub fn io_error_to_nbd(err: &io::Error) -> u32 {
    if let Some(errno) = err.raw_os_error() {
        return match errno_to_nbd(errno) {
            0 => NBD_EIO,
            e => e,
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
        io::ErrorKind::OutOfMemory => NBD_ENOMEM,
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => NBD_EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => NBD_ENOSPC,
        io::ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// The name of an option, for messages (as QEMU's `nbd_opt_lookup`).
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        4 => "peek export",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// The name of a command, for messages (as QEMU's `nbd_cmd_lookup`).
pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write zeroes",
        CMD_BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_follows_qemu() {
        assert_eq!(errno_to_nbd(libc::EROFS), NBD_EPERM);
        assert_eq!(errno_to_nbd(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::EFBIG), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::EOPNOTSUPP), NBD_ENOTSUP);
        assert_eq!(errno_to_nbd(libc::ENOENT), NBD_EINVAL);
        assert_eq!(errno_to_nbd(libc::EBUSY), NBD_EINVAL);
        assert_eq!(
            io_error_to_nbd(&io::Error::from_raw_os_error(libc::EIO)),
            NBD_EIO
        );
        assert_eq!(io_error_to_nbd(&io::Error::other("x")), NBD_EIO);
        assert_eq!(
            io_error_to_nbd(&io::Error::from(io::ErrorKind::Unsupported)),
            NBD_ENOTSUP
        );
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
