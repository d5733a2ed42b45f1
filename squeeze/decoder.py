"""emit-decoder: a tiny standalone Python decoder (numpy + torch + the codecs an artifact uses).

Users paste it into a script whose bytes count against a limit, so it is terse on purpose; it implements exactly the
reconstruction of docs/FORMAT.md and the tests hold it bit-for-bit equal to squeeze.load on every codec and width.
Each codec contributes its own import line and decode lambda (squeeze/codecs/*: DECODER_IMPORT, DECODER_EXPR);
a codec that needs a loop and the section layout (rans) also contributes DECODER_DEF, which defines V(header) ->
{section: parts} for the layout, replacing the no-op V of the template; only artifacts that use it pay its bytes.

Errors: the CRCs catch damage; for what they cannot catch (a file too short, a header whose values are wrong), load
turns any exception into ValueError("squeeze: <path>: malformed artifact <the exception>"), one line with no chained
traceback, instead of spending bytes on each check format.read makes; the one check it spends bytes on is of `bits`,
since 1<<(bits-1) of a hostile 2^34 would build a 2 GB integer before anything failed. OSError from open() passes
through as is.
"""
import json

from . import codecs, format

_TEMPLATE = '''\
# squeeze decoder, format 1.0-1.%(minor)d: load(path)->{name:tensor}
import json,zlib,numpy as np,torch%(imports)s
D={%(codecs)s}
C=%(ids)s
V=lambda H:{}
T={k:getattr(torch,a)for k,a in zip("f32 f16 bf16 f64 i8 i16 i32 i64 u8 bool%(f8)s".split(),"float32 float16 bfloat16 \
float64 int8 int16 int32 int64 uint8 bool%(float8)s".split())}
class Q(ValueError):0
def E(m):raise Q("squeeze: "+m)from None
def X(c,b,n,w,l):
 if c not in D:E("codec %%r not in this decoder"%%c)
 o=D[c](b,n,l if w<2 else[(1,n)])
 if len(o)!=n:E("bad %%s stream"%%c)
 return np.frombuffer(o,np.uint8).reshape(w,-1).T.tobytes()if w>1 else o
def A(b,c,s):return torch.from_numpy(np.frombuffer(b,"u%%d"%%T[c].itemsize).copy()).view(T[c]).reshape(s)
def load(p):
 f=open(p,"rb").read()
 try:return L(p,f)
 except Q:raise
 except Exception as e:E(p+": malformed artifact "+repr(e)[:99])
def L(p,f):
 if f[:5]!=b"SQZ\\0\\1"or f[5]>%(minor)d:E(p+": not a squeeze v1.0-1.%(minor)d artifact")
 c=f[6];h,r,k=np.frombuffer(f,"<u4",3,8).tolist()
 b=f[20:20+h]
 if zlib.crc32(b)!=k:E(p+": header checksum mismatch")
 H=json.loads(X(C[c],b,r,1,0));o=20+h;S=[];Y=V(H)
 for i,s in enumerate(H["sections"]):
  b=f[o:o+s["size"]];o+=s["size"]
  if zlib.crc32(b)!=s["crc"]:E(p+": section %%r checksum mismatch"%%s["name"])
  S.append(X(s["codec"],b,s["raw"],s["shuffle"],[m[3]for m in sorted(Y.get(i,[]))]))
 if o!=len(f):E(p+": bad length")
 P=lambda r:S[r[0]][r[1]:r[1]+r[2]];R={}
 for t in H["tensors"]:
  s=t["shape"];d=T[t["dtype"]];N=int(np.prod(s));e=t["name"]
%(stack)s  if"alias"in t:continue
  if N<1:R[e]=torch.zeros(s,dtype=d);continue
  if"data"in t:R[e]=A(P(t["data"]),t["store"],s).to(d);continue
  q=t["q"];n=q["bits"];g=q["group"];y=s[0]if len(s)>1 else 1;x=N//y;u=np.frombuffer(P(t["codes"]),np.uint8)
  if n>8:E(p+": bad bits")
  u=np.packbits(np.unpackbits(u,bitorder="little")[:N*n].reshape(N,n),1,bitorder="little")[:,0]\
if q["pack"]=="dense"and n<8 else u[:N]
  c=torch.from_numpy((u.astype(np.int16)-(1<<n-1)+1).astype(np.int8)).reshape(y,x)
  z=A(P(t["scales"]),q["sdtype"],(y,-1)).float();z=z[:,:1]if g==0 else z[:,torch.arange(x)//g]
%(reconstruct)s return{t["name"]:(R[t["alias"]].t().contiguous()if t["t"]else R[t["alias"]])if"alias"in t else R[t["name"]]\
for t in H["tensors"]%(keep)s}
'''

# How a quantized tensor is rebuilt: w = q·scale, cast (1.1); plus the low-rank correction's outer products, added in
# k order as docs/FORMAT.md says (1.2). Decoders for files that declare 1.1 leave the 1.2 lines out and refuse 1.2.
_RECONSTRUCT = {1: """  R[e]=(c.float()*z).to(d).reshape(s)
""", 2: """  w=c.float()*z;k=q.get("rank",0);a=k and A(P(t["lowrank"]),q["ldtype"],-1).float();o=y*k
  for j in range(k):w=w+a[j:o:k,None]*a[o+j*x:o+j*x+x]
  R[e]=w.to(d).reshape(s)
"""}
_RECONSTRUCT[3] = _RECONSTRUCT[2]
# A stack (1.3) is its slices, decoded before it, concatenated and reshaped; the slices leave R, so the result keeps
# only the checkpoint's tensors.
_STACK = {3: '  if"stack"in t:R[e]=torch.cat([R.pop(n).reshape(-1)for n in t["stack"]]'
             '+[torch.zeros(0,dtype=d)]).reshape(s);continue\n'}
_KEEP = {3: 'if"alias"in t or t["name"]in R'}


def emit(codec_names, minor: int = 1, fp8: bool = False) -> str:
    """Decoder source for artifacts of format 1.0 to 1.`minor` whose header and sections use only `codec_names`
    (and, with `fp8`, the fp8 dtype codes of 1.3: two names in the dtype table; without them a decoder refuses an fp8
    tensor as malformed)."""
    used = [m for m in codecs.BY_NAME.values() if m.NAME in set(codec_names)]
    imports = "".join(f"\n{m.DECODER_IMPORT}" for m in used if m.DECODER_IMPORT)
    table = ",".join(f'"{m.NAME}":{m.DECODER_EXPR}' for m in used)
    ids = [m.NAME if m in used and not getattr(m, "USES_LAYOUT", False) else ""
           for m in sorted(codecs.BY_NAME.values(), key=lambda m: m.ID)]
    while ids and not ids[-1]:
        ids.pop()
    source = _TEMPLATE % {"imports": imports, "codecs": table, "ids": json.dumps(ids, separators=(",", ":")),
                          "minor": minor, "reconstruct": _RECONSTRUCT[minor], "stack": _STACK.get(minor, ""),
                          "keep": _KEEP.get(minor, ""), "f8": " f8e4m3 f8e5m2" if fp8 else "",
                          "float8": " float8_e4m3fn float8_e5m2" if fp8 else ""}
    defs = "".join(getattr(m, "DECODER_DEF", "") for m in used)
    if defs:  # a layout-aware codec's definitions include the real V
        source = source.replace("V=lambda H:{}\n", "") + defs
    return source


def codecs_used(art: format.Artifact) -> list:
    art.check_crcs()  # refuse to emit a decoder for a damaged artifact
    return list(dict.fromkeys([art.header_codec] + [s["codec"] for s in art.sections]))


def emit_for(path_or_bytes) -> str:
    from .loader import read_artifact
    art = read_artifact(path_or_bytes)
    return emit(codecs_used(art), art.minor, any(format.fp8_code_of(t) for t in art.tensors))
