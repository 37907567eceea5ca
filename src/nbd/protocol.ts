/**
 * NBD wire format as pure data: magics, option/reply/command numbers, flags, errno values,
 * header sizes and limits (numbers only, plus the one wire string 'base:allocation'). No
 * logic and no imports (nbdkit's nbd-protocol.h is the model): names for these numbers and
 * the errno mappings are in protocol-names.ts, codecs in the server/ and client/ files.
 * Source: NetworkBlockDevice/nbd doc/proto.md. All integers are big-endian.
 * Threads: any.
 */

// Magics. 64-bit values are split into high and low 32-bit halves so that hot paths can
// compare them with DataView.getUint32 and never touch BigInt.
export const kNbdMagicHigh = 0x4e42444d; // "NBDM"
export const kNbdMagicLow = 0x41474943; // "AGIC"
export const kIHaveOptHigh = 0x49484156; // "IHAV"
export const kIHaveOptLow = 0x454f5054; // "EOPT"
export const kOptionReplyMagicHigh = 0x0003e889;
export const kOptionReplyMagicLow = 0x045565a9;
export const kOldstyleMagicHigh = 0x00004202;
export const kOldstyleMagicLow = 0x81861253;
export const kRequestMagic = 0x25609513;
export const kSimpleReplyMagic = 0x67446698;
export const kStructuredReplyMagic = 0x668e33ef;
export const kExtendedRequestMagic = 0x21e41c71;
export const kExtendedReplyMagic = 0x6e8a278c;

export const kDefaultPort = 10809;

// Handshake flags (server, u16) and client flags (u32).
export const kFlagFixedNewstyle = 0x1;
export const kFlagNoZeroes = 0x2;
export const kClientFlagFixedNewstyle = 0x1;
export const kClientFlagNoZeroes = 0x2;

// Options.
export const kOptExportName = 1;
export const kOptAbort = 2;
export const kOptList = 3;
export const kOptPeekExport = 4;
export const kOptStartTls = 5;
export const kOptInfo = 6;
export const kOptGo = 7;
export const kOptStructuredReply = 8;
export const kOptListMetaContext = 9;
export const kOptSetMetaContext = 10;
export const kOptExtendedHeaders = 11;

// Option reply types.
export const kRepAck = 1;
export const kRepServer = 2;
export const kRepInfo = 3;
export const kRepMetaContext = 4;
export const kRepErrorBit = 0x80000000;
export const kRepErrUnsup = 0x80000001;
export const kRepErrPolicy = 0x80000002;
export const kRepErrInvalid = 0x80000003;
export const kRepErrPlatform = 0x80000004;
export const kRepErrTlsReqd = 0x80000005;
export const kRepErrUnknown = 0x80000006;
export const kRepErrShutdown = 0x80000007;
export const kRepErrBlockSizeReqd = 0x80000008;
export const kRepErrTooBig = 0x80000009;
export const kRepErrExtHeaderReqd = 0x8000000a;

// Info types.
export const kInfoExport = 0;
export const kInfoName = 1;
export const kInfoDescription = 2;
export const kInfoBlockSize = 3;

// Transmission flags (u16).
export const kTxFlagHasFlags = 0x0001;
export const kTxFlagReadOnly = 0x0002;
export const kTxFlagSendFlush = 0x0004;
export const kTxFlagSendFua = 0x0008;
export const kTxFlagRotational = 0x0010;
export const kTxFlagSendTrim = 0x0020;
export const kTxFlagSendWriteZeroes = 0x0040;
export const kTxFlagSendDf = 0x0080;
export const kTxFlagCanMultiConn = 0x0100;
export const kTxFlagSendResize = 0x0200;
export const kTxFlagSendCache = 0x0400;
export const kTxFlagSendFastZero = 0x0800;

// Commands.
export const kCmdRead = 0;
export const kCmdWrite = 1;
export const kCmdDisc = 2;
export const kCmdFlush = 3;
export const kCmdTrim = 4;
export const kCmdCache = 5;
export const kCmdWriteZeroes = 6;
export const kCmdBlockStatus = 7;
export const kCmdResize = 8;

// Command flags (u16).
export const kCmdFlagFua = 0x01;
export const kCmdFlagNoHole = 0x02;
export const kCmdFlagDf = 0x04;
export const kCmdFlagReqOne = 0x08;
export const kCmdFlagFastZero = 0x10;
export const kCmdFlagPayloadLen = 0x20;

// Structured reply flags and chunk types.
export const kReplyFlagDone = 0x1;
export const kReplyTypeNone = 0;
export const kReplyTypeOffsetData = 1;
export const kReplyTypeOffsetHole = 2;
export const kReplyTypeBlockStatus = 5;
export const kReplyTypeBlockStatusExt = 6;
export const kReplyTypeErrorBit = 0x8000;
export const kReplyTypeError = 0x8001;
export const kReplyTypeErrorOffset = 0x8002;

// base:allocation extent flags.
export const kStateHole = 0x1;
export const kStateZero = 0x2;
export const kMetaContextBaseAllocation = 'base:allocation';

// Error values (NBD protocol numbers, not the host's errno; names in protocol-names.ts).
export const kEPerm = 1;
export const kEIo = 5;
export const kENoMem = 12;
export const kEInval = 22;
export const kENoSpc = 28;
export const kEOverflow = 75;
export const kENotSup = 95;
export const kEShutdown = 108;

// Header sizes in bytes.
export const kGreetingBytes = 18; // NBDMAGIC u64, IHAVEOPT u64, handshake flags u16
export const kOptionHeaderBytes = 16; // IHAVEOPT u64, option u32, length u32
export const kOptionReplyHeaderBytes = 20; // magic u64, option u32, type u32, length u32
export const kExportNameReplyBytes = 10; // size u64, flags u16 (+124 zero bytes unless NO_ZEROES)
export const kExportNamePaddingBytes = 124;
export const kRequestHeaderBytes = 28;
export const kSimpleReplyHeaderBytes = 16;
export const kStructuredReplyHeaderBytes = 20;

// Limits from the spec.
export const kStringBytesMax = 4096;
export const kBlockSizeMinimumMax = 65536;
export const kDefaultPayloadBytesMax = 32 * 1024 * 1024;
