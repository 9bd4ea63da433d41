"""The wire format between the code reward's judge and candidate sandboxes (`posttrain.rewards.code`).

Values cross as tagged JSON (`_enc` / `_dec`): only None/bool/int/float/str/bytes/complex/list/
tuple/dict/set/frozenset, rebuilt on the receiving side from JSON's own types (subclasses become
their builtin base; anything else is malformed). Messages are length-prefixed frames on a pipe
(`_send` / `_recv`). These functions run inside the sandboxes: `posttrain.rewards.code` ships
their source ahead of `_agent` and `_judge`, so they must stay self-contained (module-level names
only from the standard library, imported inside).
"""

def _enc(v, depth=0):
    """Plain data -> JSON-able tagged form. Subclasses are converted to their builtin base."""
    if v is None or v is True or v is False or type(v) in (str, float):
        return v
    if depth > 200:
        raise ValueError("value nested too deeply")
    d = depth + 1
    if isinstance(v, int):
        return int(v) if int(v).bit_length() < 12000 else {"i": hex(int(v))}
    if isinstance(v, (float, str)):
        return float(v) if isinstance(v, float) else str.__str__(v)
    if isinstance(v, (bytes, bytearray)):
        return {"b": bytes(v).hex()}
    if isinstance(v, complex):
        return {"c": [complex(v).real, complex(v).imag]}
    if isinstance(v, dict):
        return {"d": [[_enc(k, d), _enc(x, d)] for k, x in dict(v).items()]}
    for base, tag in ((list, None), (tuple, "t"), (frozenset, "f"), (set, "s")):
        if isinstance(v, base):
            items = [_enc(x, d) for x in base(v)]
            return items if tag is None else {tag: items}
    raise TypeError("a %s value cannot cross the sandbox boundary (plain data only)" % type(v).__name__)


def _dec(v, depth=0):
    """Tagged form -> genuine builtin values (exact types only; anything else is malformed)."""
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if depth > 200:
        raise ValueError("value nested too deeply")
    d = depth + 1
    if t is list:
        return [_dec(x, d) for x in v]
    if t is dict and len(v) == 1:
        ((tag, x),) = v.items()
        if tag in ("t", "s", "f", "d") and type(x) is list:
            items = [_dec(y, d) for y in x]
            if tag != "d":
                return {"t": tuple, "s": set, "f": frozenset}[tag](items)
            if all(type(kv) is list and len(kv) == 2 for kv in items):
                return dict(items)
        if tag in ("b", "i") and type(x) is str:
            return bytes.fromhex(x) if tag == "b" else int(x, 16)
        if tag == "c" and type(x) is list and len(x) == 2 and all(type(y) in (int, float) for y in x):
            return complex(x[0], x[1])
    raise ValueError("malformed value from the candidate")


def _send(fd, obj):
    import json
    import os

    data = json.dumps(obj).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd, cap):
    """One frame, or None on a clean end of stream; raises on a truncated or oversized frame."""
    import json
    import os

    def readn(n):
        buf = b""
        while len(buf) < n and (chunk := os.read(fd, min(n - len(buf), 1 << 20))):
            buf += chunk
        return buf

    head = readn(4)
    if not head:
        return None
    n = int.from_bytes(head, "big")
    if len(head) < 4 or n > cap:
        raise ValueError("bad frame from the candidate")
    body = readn(n)
    if len(body) != n:
        raise EOFError("truncated frame from the candidate")
    return json.loads(body)
