"""Coverage-guided fuzzing (atheris, libFuzzer) of the code that reads untrusted bytes before
any service logic: the bulk request parser (``shoal.wire.parse_with_tensor``), tensor
validation (``shoal.wire.unpack``) and bearer-token verification. Every input must either
parse or raise a ``ShoalError`` / ``DecodeError``; anything else is a crash libFuzzer reports.

``python tests/fuzz/atheris_parsers.py -atheris_runs=N`` (tests/test_fuzz.py runs it briefly
where atheris is installed)."""
import sys

import atheris

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from shoal import security
    from shoal.errors import ShoalError
    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import parse_with_tensor, unpack

KEY = b"k" * 32
PARSE = parse_with_tensor(pb.IngestRequest, 4)
DTYPES = ["float32", "int64", "int32", "uint16", "float16", "bfloat16", "x"]


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 2)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if which == 0:
            PARSE(rest)
        elif which == 1:
            t = pb.Tensor.FromString(rest)
            unpack(t, "t", DTYPES[len(rest) % len(DTYPES)], (len(rest) % 3) or None)
        else:
            security.verify_token(KEY, rest.decode("utf-8", "replace"))
    except (ShoalError, DecodeError):
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
