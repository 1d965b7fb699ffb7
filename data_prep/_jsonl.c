/* Fast path for the common jsonl line: one JSON object whose members all have string values, one of them the
 * text field. texts(block, key) returns (data, offsets): the text values of the block's non-blank lines, decoded
 * to UTF-8 back to back in `data`, and `offsets` (int64, native order, one more than the lines) where each starts;
 * or None as soon as any line is anything else, and the caller parses the block the general way.
 *
 * The output must be what json.loads(line)[key].encode("utf-8") gives for every line, or None. So the grammar is
 * json.loads's, narrowed: whitespace is space, tab, CR, LF; raw bytes below 0x20 in a string, escapes other than
 * \" \\ \/ \b \f \n \r \t \uXXXX, surrogate escapes that do not pair (json.loads keeps them; UTF-8 cannot), any
 * byte that is not strict UTF-8 (json.loads decodes the whole line first), a missing text field, and values that
 * are not strings (null, numbers, nested objects, ...) all give None. Keys are compared decoded; with duplicates
 * the last one counts, as in a dict. A line is blank, and skipped, when bytes.strip() would leave nothing of it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t more) {
    if (o->len + more <= o->cap) return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more) cap *= 2;
    char *p = PyMem_RawRealloc(o->buf, cap);
    if (!p) return -1;
    o->buf = p;
    o->cap = cap;
    return 0;
}

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

static int is_strip_ws(unsigned char c) {  /* what bytes.strip() removes */
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\x0b' || c == '\x0c';
}

/* Length of the strict UTF-8 sequence at p (as Python's decoder accepts it), or 0 if there is none. */
static int utf8_len(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0];
    int n;
    unsigned char lo = 0x80, hi = 0xBF;  /* range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c == 0xE0) { n = 3; lo = 0xA0; }
    else if (c == 0xED) { n = 3; hi = 0x9F; }  /* no surrogates */
    else if (c >= 0xE1 && c <= 0xEF) n = 3;
    else if (c == 0xF0) { n = 4; lo = 0x90; }
    else if (c == 0xF4) { n = 4; hi = 0x8F; }  /* nothing above U+10FFFF */
    else if (c >= 0xF1 && c <= 0xF3) n = 4;
    else return 0;
    if (end - p < n || p[1] < lo || p[1] > hi) return 0;
    for (int i = 2; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    return n;
}

static int hex4(const unsigned char *p, const unsigned char *end, unsigned *v) {
    if (end - p < 4) return -1;
    unsigned x = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = p[i];
        x <<= 4;
        if (c >= '0' && c <= '9') x |= c - '0';
        else if (c >= 'a' && c <= 'f') x |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') x |= c - 'A' + 10;
        else return -1;
    }
    *v = x;
    return 0;
}

static Py_ssize_t put_utf8(char *d, unsigned cp) {
    if (cp < 0x80) { d[0] = (char)cp; return 1; }
    if (cp < 0x800) { d[0] = (char)(0xC0 | cp >> 6); d[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        d[0] = (char)(0xE0 | cp >> 12); d[1] = (char)(0x80 | ((cp >> 6) & 0x3F)); d[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    d[0] = (char)(0xF0 | cp >> 18); d[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    d[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); d[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Parses the string whose opening quote is at *pp. With out, appends its decoded UTF-8 there; without, only checks
 * it. Leaves *pp after the closing quote. Decoding never lengthens a string (an escape of 2, 6 or 12 bytes gives 1
 * to 4), so the room for the rest of the line, reserved once, is enough. */
static int scan_string(const unsigned char **pp, const unsigned char *end, Out *out) {
    const unsigned char *p = *pp + 1;
    char *d = NULL;
    if (out) {
        if (out_reserve(out, end - p)) return -2;
        d = out->buf + out->len;
    }
    while (p < end) {
        unsigned char c = *p;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {  /* plain ASCII, the common case */
            if (d) *d++ = (char)c;
            p++;
            continue;
        }
        if (c == '"') {
            if (out) out->len = d - out->buf;
            *pp = p + 1;
            return 0;
        }
        if (c < 0x20) return -1;
        if (c == '\\') {
            if (end - p < 2) return -1;
            unsigned cp;
            switch (p[1]) {
                case '"': cp = '"'; break;
                case '\\': cp = '\\'; break;
                case '/': cp = '/'; break;
                case 'b': cp = '\b'; break;
                case 'f': cp = '\f'; break;
                case 'n': cp = '\n'; break;
                case 'r': cp = '\r'; break;
                case 't': cp = '\t'; break;
                case 'u': {
                    if (hex4(p + 2, end, &cp)) return -1;
                    if (cp >= 0xDC00 && cp <= 0xDFFF) return -1;  /* a lone low surrogate */
                    if (cp >= 0xD800 && cp <= 0xDBFF) {           /* must pair with a low one */
                        unsigned lo;
                        if (end - p < 12 || p[6] != '\\' || p[7] != 'u' || hex4(p + 8, end, &lo) ||
                            lo < 0xDC00 || lo > 0xDFFF)
                            return -1;
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        p += 6;
                    }
                    p += 4;
                    break;
                }
                default: return -1;
            }
            p += 2;
            if (d) d += put_utf8(d, cp);
            continue;
        }
        int n = utf8_len(p, end);
        if (!n) return -1;
        if (d) { memcpy(d, p, n); d += n; }
        p += n;
    }
    return -1;
}

/* One non-blank line: appends its text value to out (name: scratch space for the keys, decoded to be compared).
 * 0 on success, -1 if it is not of the fast-path form, -2 on memory errors. */
static int scan_line(const unsigned char *p, const unsigned char *end, const char *key, Py_ssize_t key_len,
                     Out *out, Out *name) {
    while (p < end && is_ws(*p)) p++;
    if (p == end || *p != '{') return -1;
    p++;
    while (p < end && is_ws(*p)) p++;
    Py_ssize_t start = out->len, text_at = -1;
    if (p < end && *p == '}') return -1;  /* {}: no text field */
    for (;;) {
        if (p == end || *p != '"') return -1;
        name->len = 0;
        int r = scan_string(&p, end, name);
        if (r) return r;
        int is_key = name->len == key_len && memcmp(name->buf, key, key_len) == 0;
        while (p < end && is_ws(*p)) p++;
        if (p == end || *p != ':') return -1;
        p++;
        while (p < end && is_ws(*p)) p++;
        if (p == end || *p != '"') return -1;
        if (is_key) {  /* a later duplicate replaces the earlier value */
            out->len = start;
            text_at = start;
            r = scan_string(&p, end, out);
        } else {
            r = scan_string(&p, end, NULL);
        }
        if (r) return r;
        while (p < end && is_ws(*p)) p++;
        if (p == end) return -1;
        if (*p == '}') break;
        if (*p != ',') return -1;
        p++;
        while (p < end && is_ws(*p)) p++;
    }
    p++;
    while (p < end && is_ws(*p)) p++;
    return (p == end && text_at >= 0) ? 0 : -1;
}

static PyObject *texts(PyObject *self, PyObject *args) {
    Py_buffer block;
    const char *key;
    Py_ssize_t key_len;
    if (!PyArg_ParseTuple(args, "y*s#", &block, &key, &key_len)) return NULL;
    const unsigned char *p = block.buf, *end = p + block.len;
    Out data = {0}, offsets = {0}, name = {0};
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    int64_t zero = 0;
    if (out_reserve(&offsets, sizeof zero)) status = -2;
    else { memcpy(offsets.buf, &zero, sizeof zero); offsets.len = sizeof zero; }
    while (status == 0 && p <= end) {
        const unsigned char *nl = memchr(p, '\n', end - p);
        const unsigned char *line_end = nl ? nl : end;
        const unsigned char *q = p;
        while (q < line_end && is_strip_ws(*q)) q++;
        if (q < line_end) {
            status = scan_line(p, line_end, key, key_len, &data, &name);
            int64_t at = data.len;
            if (status == 0 && out_reserve(&offsets, sizeof at)) status = -2;
            if (status == 0) { memcpy(offsets.buf + offsets.len, &at, sizeof at); offsets.len += sizeof at; }
        }
        if (!nl) break;
        p = nl + 1;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&block);
    PyObject *result = NULL;
    if (status == -2) PyErr_NoMemory();
    else if (status == -1) result = Py_NewRef(Py_None);
    else result = Py_BuildValue("(y#y#)", data.buf ? data.buf : "", data.len, offsets.buf, offsets.len);
    PyMem_RawFree(data.buf);
    PyMem_RawFree(offsets.buf);
    PyMem_RawFree(name.buf);
    return result;
}

static PyMethodDef methods[] = {
    {"texts", texts, METH_VARARGS,
     "texts(block: bytes, key: str) -> (data: bytes, offsets: bytes of int64) | None\n\n"
     "The key values of a block of jsonl lines, if every non-blank line is one object whose members are all "
     "strings; else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonl", "Fast path for simple jsonl lines.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__jsonl(void) { return PyModule_Create(&module); }
