"""emit-decoder: a tiny standalone Python decoder (numpy + torch + the codecs an artifact uses).

Users paste it into a script whose bytes count against a limit, so it is terse on purpose; it implements exactly the
reconstruction of docs/FORMAT.md and the tests hold it bit-for-bit equal to squeeze.load on every codec and width.

One name: the source is a single function, `squeeze_load(path_or_bytes) -> {name: tensor}`; its imports and helpers
are its locals, so exec'ing it (or pasting it into train_gpt.py, or importing it as a module) binds `squeeze_load` and
nothing else, and clobbers none of the script's names. The helpers are rebuilt on each call (microseconds).

Only what the artifact uses: each codec contributes its import and decode lambda (squeeze/codecs/*: DECODER_IMPORT,
DECODER_EXPR); a codec that needs a loop and the section layout (rans) also contributes DECODER_DEF, which defines
V(header) -> {section: parts} for the layout, replacing the no-op V of the template. The format's optional features
(low-rank corrections 1.2, stacks 1.3, fp8 dtype codes 1.3, quantized factors 1.4) are emitted only for an artifact that uses them; a decoder
reading up to 1.2 or 1.3 without one of them refuses a file that needs it by name ("squeeze: P: stack not in this
decoder"; "f8" names the fp8 codes), so the version check stays honest.

Errors: the CRCs catch damage; for what they cannot catch (a file too short, a header whose values are wrong),
squeeze_load turns any exception into ValueError("squeeze: <path>: malformed artifact <the exception>"), one line with
no chained traceback, instead of spending bytes on each check format.read makes; the one check it spends bytes on is
of `bits`, since 1<<(bits-1) of a hostile 2^34 would build a 2 GB integer before anything failed. Every message
starts "squeeze: <path>: " ("<bytes>" when given bytes). OSError from open() passes through as is.

wrap(source, how): the self-extracting one-liner (`exec` of the lzma- or brotli-compressed source, base85), which
binds the same one name.
"""
import base64
import json
import lzma

from . import codecs, format

NAME = "squeeze_load"
WRAPS = ("none", "lzma", "brotli")

_TEMPLATE = '''\
# squeeze decoder, format 1.0-1.%(minor)d: squeeze_load(path|bytes)->{name:tensor}
def squeeze_load(p):
 import json,zlib,numpy as np,torch%(imports)s
%(defs)s D={%(codecs)s};C=%(ids)s
 T={k:getattr(torch,k.replace("f","float").replace("i","int").replace("u","uint"))for k in"f32 f16 bf16 f64 i8 i16 \
i32 i64 u8 bool".split()}%(f8)s
 class Q(ValueError):0
 def E(m):raise Q(f"squeeze: {p}: {m}")from None
 def X(c,b,n,w,l):
  if c not in D:E("codec %%r not in this decoder"%%c)
  o=D[c](b,n,l if w<2 else[(1,n)])
  if len(o)!=n:E("bad %%s stream"%%c)
  return np.frombuffer(o,np.uint8).reshape(w,-1).T.tobytes()if w>1 else o
 A=lambda b,c,s:torch.frombuffer(bytearray(b),dtype=T[c]).reshape(s)
 def L(f):
  if f[:5]!=b"SQZ\\0\\1"or f[5]>%(minor)d:E("not a squeeze v1.0-1.%(minor)d artifact")
  c=f[6];h,r,k=np.frombuffer(f,"<u4",3,8).tolist();b=f[20:20+h]
  if zlib.crc32(b)!=k:E("header checksum mismatch")
  H=json.loads(X(C[c],b,r,1,0));o=20+h;S=[];Y=V(H)
  for i,s in enumerate(H["sections"]):
   b=f[o:o+s["size"]];o+=s["size"]
   if zlib.crc32(b)!=s["crc"]:E("section %%r checksum mismatch"%%s["name"])
   S.append(X(s["codec"],b,s["raw"],s["shuffle"],[m[3]for m in sorted(Y.get(i,[]))]))
  if o!=len(f):E("bad length")
  P=lambda r:S[r[0]][r[1]:r[1]+r[2]];R={}
  for t in H["tensors"]:
%(missing)s   s=t["shape"];d=T[t["dtype"]];N=int(np.prod(s));e=t["name"]
%(stack)s   if"alias"in t:continue
   if N<1:R[e]=torch.zeros(s,dtype=d);continue
   if"data"in t:R[e]=A(P(t["data"]),t["store"],s).to(d);continue
   q=t["q"];n=q["bits"];g=q["group"];y=s[0]if s[1:]else 1;x=N//y;u=np.frombuffer(P(t["codes"]),np.uint8)
   if n>8:E("bad bits")
   u=np.packbits(np.unpackbits(u,bitorder="little")[:N*n].reshape(N,n),1,bitorder="little")[:,0]\
if q["pack"]=="dense"else u[:N]
   c=torch.from_numpy(u.astype("f")).reshape(y,x);c-=(1<<n-1)-1
   z=A(P(t["scales"]),q["sdtype"],(y,-1)).float();z=z[:,torch.arange(x)//g]if g else z[:,:1]
%(reconstruct)s  return{t["name"]:%(result)s}
 if hasattr(p,"hex"):f=bytes(p);p="<bytes>"
 else:f=open(p,"rb").read()
 try:return L(f)
 except Q:raise
 except Exception as e:E("malformed artifact "+repr(e)[:99])
'''

# How a quantized tensor is rebuilt: w = q·scale, cast (1.1); with low-rank corrections (1.2), plus their outer
# products, added in k order as docs/FORMAT.md says.
_PLAIN = "   R[e]=c.mul_(z).to(d).reshape(s)\n"
_LOWRANK = """\
   w=c.mul_(z);k=q.get("rank",0);a=k and A(P(t["lowrank"]),q["ldtype"],-1).float();o=y*k
   for j in range(k):w=w+a[j:o:k,None]*a[o+j*x:o+j*x+x]
   R[e]=w.to(d).reshape(s)
"""
# With quantized factors (1.4, ldtype "i8"): U's codes [r, R] and V's [r, C] as int8, then U's scales (one per
# component) and V's (per lgroup elements of a row); U (I) and V (J) rebuilt as code·scale, then the same outer
# products. Its names are ones L reads from no enclosing scope (V is the layout function, A the byte reader, ...).
_LOWRANK_Q = """\
   w=c.mul_(z);k=q.get("rank",0);o=y*k
   if k:
    b=P(t["lowrank"]);B=q["ldtype"];a=A(b[:o+k*x]if B=="i8"else b,B,-1).float()
    if B=="i8":M=q["lgroup"]or x;O=A(b[o+k*x:],q["lsdtype"],-1).float();I=a[:o].reshape(k,y)*O[:k,None];\
J=a[o:].reshape(k,x)*O[k:].reshape(k,-1)[:,torch.arange(x)//M]
    else:I=a[:o].reshape(y,k).T;J=a[o:].reshape(k,x)
   for j in range(k):w=w+I[j,:,None]*J[j]
   R[e]=w.to(d).reshape(s)
"""
# A stack (1.3) is its slices, decoded before it, concatenated and reshaped; the slices leave R, so the result keeps
# only the checkpoint's tensors.
_STACK = ('   if"stack"in t:R[e]=torch.cat([R.pop(n).reshape(-1)for n in t["stack"]]'
          '+[torch.zeros(0,dtype=d)]).reshape(s);continue\n')
# The result: every tensor of the checkpoint, an alias as its target (transposed when "t"); with stacks, a slice is
# not one (it left R).
_RESULT = 'R[t["alias"]].t().contiguous()if t.get("t")else R[t.get("alias",t["name"])]for t in H["tensors"]'
_RESULT_STACK = 'R[a].t().contiguous()if t.get("t")else R[a]for t in H["tensors"]if(a:=t.get("alias",t["name"]))in R'
_F8 = ';T.update(f8e4m3=torch.float8_e4m3fn,f8e5m2=torch.float8_e5m2)'


def _missing(names: list) -> str:
    """The refusal of a file that uses a feature the decoder was emitted without: a key of the tensor object
    ("stack", "lowrank"), or "f8" in its dtype or store code (the fp8 codes f8e4m3, f8e5m2)."""
    if not names:
        return ""
    if len(names) == 1:
        test = '"f8"in t["dtype"]+t.get("store","")' if names == ["f8"] else '"%s"in t' % names[0]
        return '   if%s:E("%s not in this decoder")\n' % (test, names[0])
    keys = ",".join('"%s"' % n for n in names)
    test = 'k in t or k in t["dtype"]+t.get("store","")' if "f8" in names else "k in t"
    return '   for k in%s:\n    if %s:E(k+" not in this decoder")\n' % (keys, test)


def emit(codec_names, minor: int = 1, fp8: bool = False, lowrank: bool | None = None,
         stack: bool | None = None) -> str:
    """Decoder source for artifacts of format 1.0 to 1.`minor` whose header and sections use only `codec_names`.

    Features: `lowrank` (1.2 low-rank corrections, and from minor 4 their quantized factors; default: minor >= 2),
    `stack` (1.3 stacks; default: minor >= 3),
    `fp8` (1.3 fp8 dtype codes; default off). A feature left out costs no bytes in a decoder whose minor is below
    the feature's; otherwise it costs one refusal line, and the decoder refuses a file using it by name."""
    lowrank = minor >= 2 if lowrank is None else lowrank and minor >= 2
    stack = minor >= 3 if stack is None else stack and minor >= 3
    fp8 = fp8 and minor >= 3
    used = [m for m in codecs.BY_NAME.values() if m.NAME in set(codec_names)]
    modules = [n for m in used if m.DECODER_IMPORT for n in m.DECODER_IMPORT.removeprefix("import ").split(",")]
    imports = "".join(f",{n}" for n in dict.fromkeys(modules))
    table = ",".join(f'"{m.NAME}":{m.DECODER_EXPR}' for m in used)
    ids = [m.NAME if m in used and not codecs.uses_layout(m.NAME) else ""  # C[id]: the header codecs by id
           for m in (codecs.BY_ID.get(i) for i in range(max(codecs.BY_ID) + 1))]
    while ids and not ids[-1]:
        ids.pop()
    missing = [n for n, has, since in (("stack", stack, 3), ("lowrank", lowrank, 2), ("f8", fp8, 3))
               if not has and minor >= since]
    defs = "".join(getattr(m, "DECODER_DEF", "") for m in used)
    if minor < 2:  # rans's V lists the part keys; a 1.1 decoder refuses a file with "lowrank" parts by its version
        defs = defs.replace(',"lowrank"', "")
    source = _TEMPLATE % {"imports": imports, "codecs": table, "ids": json.dumps(ids, separators=(",", ":")),
                          "minor": minor, "reconstruct": (_LOWRANK_Q if minor >= 4 else _LOWRANK) if lowrank else _PLAIN,
                          "stack": _STACK if stack else "", "result": _RESULT_STACK if stack else _RESULT,
                          "missing": _missing(missing), "f8": _F8 if fp8 else "",
                          "defs": "".join(" " + line for line in defs.splitlines(True)) or " V=lambda H:{}\n"}
    return source


def wrap(source: str, how: str = "none") -> str:
    """The self-extracting form of a decoder's `source`: one line that exec's its lzma (raw LZMA2, the lc/pb that
    compress it best) or brotli (quality 11) compression, base85-encoded; "none": `source` itself. Imports go through
    __import__, so the line binds only what the source binds (paste it at a script's top level: exec inside a
    function binds nothing the function can see)."""
    if how == "none":
        return source
    raw = source.encode("utf-8")
    if how == "lzma":
        # FORMAT_RAW (3) with one LZMA2 filter (id 33): no .xz container; LZMA2 chunks carry lc/lp/pb themselves.
        packed = min((lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{
            "id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": 0, "pb": pb}])
            for lc in range(5) for pb in range(3)), key=len)
        call = '__import__("lzma").decompress(%s,3,None,[{"id":33}])'
    elif how == "brotli":
        import brotli
        packed = brotli.compress(raw, quality=11)  # window and mode change nothing on a decoder (measured)
        call = '__import__("brotli").decompress(%s)'
    else:
        raise ValueError(f"wrap: {how!r} is not one of {', '.join(WRAPS)}")
    blob = '__import__("base64").b85decode("%s")' % base64.b85encode(packed).decode("ascii")
    return f"exec({call % blob})\n"


_wrap = wrap  # emit_for's argument `wrap` hides the function


def codecs_used(art: format.Artifact) -> list:
    art.check_crcs()  # refuse to emit a decoder for a damaged artifact
    return list(dict.fromkeys([art.header_codec] + [s["codec"] for s in art.sections]))


def features_of(art: format.Artifact) -> dict:
    """The optional format features the artifact's tensors use, as emit's keyword arguments."""
    return {"fp8": any(format.fp8_code_of(t) for t in art.tensors),
            "lowrank": any("lowrank" in t for t in art.tensors),
            "stack": any("stack" in t for t in art.tensors)}


def emit_for(path_or_bytes, wrap: str = "none") -> str:
    """The decoder for this artifact (its codecs and features, its minor version), wrapped as `wrap` says."""
    from .loader import read_artifact
    art = read_artifact(path_or_bytes)
    return _wrap(emit(codecs_used(art), art.minor, **features_of(art)), wrap)
