/* Greedy longest-match byte tokenizer for the RWKV World vocab.
 *
 * The trie is stored as a double array (Aoe 1989): the child of slot s on byte c is slot base[s] + c, valid when
 * that slot's check names s as its parent. A step of the walk is then one 8-byte read, and the World vocab's ~116k
 * nodes fit in about 1 MB, so the walk stays in cache. The trie is immutable after construction, so encode()
 * releases the GIL and threads may share one Trie.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NO_TOKEN UINT32_MAX
#define FREE_SLOT 0u             /* check of a slot no node uses (the root's too: it is no one's child) */
#define ENDS_TOKEN 0x80000000u   /* check bit: a token ends at this node */
#define PARENT_MASK 0x7fffffffu  /* check bits: parent slot + 1 */
#define MAX_SLOTS (1u << 30)

typedef struct {
    uint32_t base;  /* children live at base + byte; 0 for a leaf, whose probes then fail the parent test */
    uint32_t check; /* (parent slot + 1) | ENDS_TOKEN if a token ends here; FREE_SLOT if unused */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    uint32_t *slot_token; /* slot -> index into ids of the token ending there; read once per emitted token */
    uint32_t n_slots;
    uint32_t n_nodes;
    uint32_t *ids;      /* token index -> token id */
    PyObject **id_objs; /* token index -> cached int, so building result lists allocates nothing per token */
    uint32_t n_tokens;
    uint32_t max_id;
    int ready; /* set once __init__ has built everything */
} Trie;

/* Construction goes through a plain linked trie whose sibling lists are kept sorted by byte. */
typedef struct {
    uint32_t first_child, next_sibling; /* 0 means none: node 0 is the root, never a child or sibling */
    uint32_t token;
    uint8_t byte;
} BuildNode;

static uint32_t build_child(BuildNode *nodes, uint32_t *n_nodes, uint32_t parent, uint8_t byte)
{
    uint32_t *link = &nodes[parent].first_child;
    while (*link != 0 && nodes[*link].byte < byte)
        link = &nodes[*link].next_sibling;
    if (*link != 0 && nodes[*link].byte == byte)
        return *link;
    uint32_t child = (*n_nodes)++;
    nodes[child].first_child = 0;
    nodes[child].next_sibling = *link;
    nodes[child].token = NO_TOKEN;
    nodes[child].byte = byte;
    *link = child;
    return child;
}

/* Make slots [0, need) exist, new ones free; returns -1 when out of memory. */
static int reserve_slots(Trie *t, uint64_t need)
{
    if (need <= t->n_slots)
        return 0;
    if (need > MAX_SLOTS)
        return -1;
    uint64_t cap = t->n_slots ? t->n_slots : 1024;
    while (cap < need)
        cap *= 2;
    Slot *grown = PyMem_Realloc(t->slots, (size_t)cap * sizeof(Slot));
    if (grown == NULL)
        return -1;
    t->slots = grown;
    uint32_t *grown_tokens = PyMem_Realloc(t->slot_token, (size_t)cap * sizeof(uint32_t));
    if (grown_tokens == NULL)
        return -1;
    t->slot_token = grown_tokens;
    for (uint64_t i = t->n_slots; i < cap; i++) {
        grown[i].base = 0;
        grown[i].check = FREE_SLOT;
        grown_tokens[i] = NO_TOKEN;
    }
    t->n_slots = (uint32_t)cap;
    return 0;
}

/* Lay the linked trie out as a double array, breadth first, each node's children at the first base that fits. */
static int place_nodes(Trie *t, const BuildNode *nodes, uint32_t n_nodes)
{
    uint32_t *queue = PyMem_Malloc((size_t)n_nodes * sizeof(uint32_t)); /* build node index */
    uint32_t *where = PyMem_Malloc((size_t)n_nodes * sizeof(uint32_t)); /* build node -> slot */
    int rc = -1;
    if (queue == NULL || where == NULL || reserve_slots(t, 256 + 1) < 0)
        goto done;
    where[0] = 0; /* the root sits in slot 0, which bases >= 1 never reach */
    queue[0] = 0;
    uint32_t head = 0, tail = 1;
    uint64_t first_free = 1; /* slots 1 .. first_free - 1 are all taken */
    while (head < tail) { /* breadth first */
        uint32_t node = queue[head++];
        uint32_t first = nodes[node].first_child;
        if (first == 0)
            continue;
        uint8_t lowest = nodes[first].byte;
        while (first_free < t->n_slots && t->slots[first_free].check != FREE_SLOT)
            first_free++;
        /* Try bases that put the lowest child on a free slot, scanning upward from the first free one. */
        for (uint64_t p = first_free > lowest ? first_free : (uint64_t)lowest + 1;; p++) {
            if (reserve_slots(t, p + 256) < 0)
                goto done;
            if (t->slots[p].check != FREE_SLOT)
                continue;
            uint64_t base = p - lowest;
            int fits = 1;
            for (uint32_t c = nodes[first].next_sibling; c != 0 && fits; c = nodes[c].next_sibling)
                fits = t->slots[base + nodes[c].byte].check == FREE_SLOT;
            if (!fits)
                continue;
            uint32_t parent_slot = where[node];
            t->slots[parent_slot].base = (uint32_t)base;
            for (uint32_t c = first; c != 0; c = nodes[c].next_sibling) {
                uint32_t s = (uint32_t)(base + nodes[c].byte);
                t->slots[s].check = (parent_slot + 1) | (nodes[c].token != NO_TOKEN ? ENDS_TOKEN : 0);
                t->slot_token[s] = nodes[c].token;
                where[c] = s;
                queue[tail++] = c;
            }
            break;
        }
    }
    rc = 0;
done:
    PyMem_Free(queue);
    PyMem_Free(where);
    return rc;
}

/* Outcome of one encode: token indices in out[0..n_out), or the byte offset where no token matched. */
typedef struct {
    uint32_t *out;
    Py_ssize_t n_out;
    Py_ssize_t bad_offset; /* -1 when every byte was covered */
    int no_memory;
} EncodeResult;

/* The longest token at src[pos..n): its slot, with *end set to where it stops; 0 (the root) when none starts there. */
static inline uint32_t longest_match(const Slot *slots, const uint8_t *src, Py_ssize_t pos, Py_ssize_t n,
                                     Py_ssize_t *end)
{
    uint32_t s = 0, best = 0;
    Py_ssize_t best_end = pos;
    /* Walk as deep as the input allows, remembering the last node that ends a token. */
    while (pos < n) {
        uint32_t child = slots[s].base + src[pos];
        uint32_t check = slots[child].check;
        if ((check & PARENT_MASK) != s + 1)
            break;
        s = child;
        pos++;
        /* Where a token ends is unpredictable, so select instead of branching. */
        int ends = (check & ENDS_TOKEN) != 0;
        best = ends ? s : best;
        best_end = ends ? pos : best_end;
    }
    *end = best_end;
    return best;
}

/* Runs without the GIL: touches only the immutable trie, the caller's buffer and raw-allocated memory. */
static void encode_core(const Trie *t, const uint8_t *src, Py_ssize_t n, EncodeResult *r)
{
    /* Tokens average 3-4 bytes; start at a third of the input and grow if needed. */
    Py_ssize_t cap = n / 3 + 64, k = 0, pos = 0;
    uint32_t *out = PyMem_RawMalloc((size_t)cap * sizeof(uint32_t));
    r->bad_offset = -1;
    r->no_memory = 0;
    if (out == NULL) {
        r->no_memory = 1;
        r->out = NULL;
        r->n_out = 0;
        return;
    }
    while (pos < n) {
        Py_ssize_t end;
        uint32_t best = longest_match(t->slots, src, pos, n, &end);
        if (best == 0) {
            r->bad_offset = pos;
            break;
        }
        if (k == cap) {
            Py_ssize_t new_cap = cap + cap / 2 + 64;
            uint32_t *grown = PyMem_RawRealloc(out, (size_t)new_cap * sizeof(uint32_t));
            if (grown == NULL) {
                r->no_memory = 1;
                break;
            }
            out = grown;
            cap = new_cap;
        }
        out[k++] = t->slot_token[best];
        pos = end;
    }
    r->out = out;
    r->n_out = k;
}

/* Encodes the buffer `data` with the GIL released; on failure sets a Python error and returns -1. */
static int encode_buffer(Trie *self, PyObject *data, EncodeResult *r)
{
    Py_buffer view;
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Trie was not initialised");
        return -1;
    }
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return -1;
    Py_BEGIN_ALLOW_THREADS
    encode_core(self, (const uint8_t *)view.buf, view.len, r);
    Py_END_ALLOW_THREADS
    if (r->no_memory) {
        PyBuffer_Release(&view);
        PyMem_RawFree(r->out);
        PyErr_NoMemory();
        return -1;
    }
    if (r->bad_offset >= 0) {
        PyErr_Format(PyExc_ValueError, "byte 0x%02x at offset %zd starts no token of the vocab",
                     ((const uint8_t *)view.buf)[r->bad_offset], r->bad_offset);
        PyBuffer_Release(&view);
        PyMem_RawFree(r->out);
        return -1;
    }
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *Trie_encode(Trie *self, PyObject *data)
{
    EncodeResult r;
    if (encode_buffer(self, data, &r) < 0)
        return NULL;
    PyObject *list = PyList_New(r.n_out);
    if (list != NULL) {
        for (Py_ssize_t i = 0; i < r.n_out; i++) {
            PyObject *o = self->id_objs[r.out[i]];
            Py_INCREF(o);
            PyList_SET_ITEM(list, i, o);
        }
    }
    PyMem_RawFree(r.out);
    return list;
}

static PyObject *Trie_encode_u16(Trie *self, PyObject *data)
{
    if (self->max_id > UINT16_MAX) {
        PyErr_Format(PyExc_ValueError, "the vocab has token id %u, which does not fit in uint16", self->max_id);
        return NULL;
    }
    EncodeResult r;
    if (encode_buffer(self, data, &r) < 0)
        return NULL;
    PyObject *arr = PyByteArray_FromStringAndSize(NULL, r.n_out * (Py_ssize_t)sizeof(uint16_t));
    if (arr != NULL) {
        uint16_t *dst = (uint16_t *)PyByteArray_AS_STRING(arr);
        for (Py_ssize_t i = 0; i < r.n_out; i++)
            dst[i] = (uint16_t)self->ids[r.out[i]];
    }
    PyMem_RawFree(r.out);
    return arr;
}

/* Documents src[offsets[d] .. offsets[d + 1]) for d < n_docs -> their ids back to back in `tokens`, each followed by
 * 0 (end of document), and sizes[d] = that document's ids plus its 0. Runs without the GIL. Returns the number of
 * ids written, or -1 with *bad_doc and *bad_offset set where a byte starts no token. */
static Py_ssize_t encode_documents_core(const Trie *t, const uint8_t *src, const int64_t *offsets, Py_ssize_t n_docs,
                                        uint16_t *tokens, int64_t *sizes, Py_ssize_t *bad_doc,
                                        Py_ssize_t *bad_offset)
{
    Py_ssize_t k = 0;
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        Py_ssize_t pos = (Py_ssize_t)offsets[d], n = (Py_ssize_t)offsets[d + 1], first = k;
        while (pos < n) {
            Py_ssize_t end;
            uint32_t best = longest_match(t->slots, src, pos, n, &end);
            if (best == 0) {
                *bad_doc = d;
                *bad_offset = pos;
                return -1;
            }
            tokens[k++] = (uint16_t)t->ids[t->slot_token[best]];
            pos = end;
        }
        tokens[k++] = 0;
        sizes[d] = k - first;
    }
    return k;
}

/* encode_documents(data, offsets) -> (tokens, sizes) as bytearrays of uint16 and int64; offsets: n + 1 native int64
 * byte offsets into data, non-decreasing (checked). See WorldTokenizer.encode_documents. */
static PyObject *Trie_encode_documents(Trie *self, PyObject *args)
{
    PyObject *data_obj, *offsets_obj, *tokens = NULL, *sizes = NULL, *result = NULL;
    Py_buffer data = {0}, offsets = {0};
    if (!PyArg_ParseTuple(args, "OO:encode_documents", &data_obj, &offsets_obj))
        return NULL;
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Trie was not initialised");
        return NULL;
    }
    if (self->max_id > UINT16_MAX) {
        PyErr_Format(PyExc_ValueError, "the vocab has token id %u, which does not fit in uint16", self->max_id);
        return NULL;
    }
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(offsets_obj, &offsets, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        goto done;
    /* numpy's int64 is 'l' or 'q' depending on the platform, maybe with a byte-order prefix */
    size_t fmt_len = offsets.format ? strlen(offsets.format) : 0;
    char kind = fmt_len ? offsets.format[fmt_len - 1] : 'B';
    if (offsets.itemsize != 8 || (kind != 'q' && kind != 'l') || offsets.len < 8) {
        PyErr_SetString(PyExc_TypeError, "offsets must be a contiguous int64 array of at least one element");
        goto done;
    }
    const int64_t *off = (const int64_t *)offsets.buf;
    Py_ssize_t n_docs = offsets.len / 8 - 1;
    if (off[0] < 0 || off[n_docs] > (int64_t)data.len) {
        PyErr_Format(PyExc_ValueError, "offsets span %lld..%lld, outside the data's %zd bytes", (long long)off[0],
                     (long long)off[n_docs], data.len);
        goto done;
    }
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        if (off[d + 1] < off[d]) {
            PyErr_Format(PyExc_ValueError, "offsets decrease at document %zd", d);
            goto done;
        }
    }
    /* At most one id per byte, plus the 0s; the unused tail is given back below. */
    Py_ssize_t cap = (Py_ssize_t)(off[n_docs] - off[0]) + n_docs;
    tokens = PyByteArray_FromStringAndSize(NULL, cap * (Py_ssize_t)sizeof(uint16_t));
    sizes = PyByteArray_FromStringAndSize(NULL, n_docs * (Py_ssize_t)sizeof(int64_t));
    if (tokens == NULL || sizes == NULL)
        goto done;
    Py_ssize_t n_tokens, bad_doc = 0, bad_offset = 0;
    uint16_t *dst = (uint16_t *)PyByteArray_AS_STRING(tokens);
    int64_t *dst_sizes = (int64_t *)PyByteArray_AS_STRING(sizes);
    Py_BEGIN_ALLOW_THREADS
    n_tokens = encode_documents_core(self, (const uint8_t *)data.buf, off, n_docs, dst, dst_sizes, &bad_doc,
                                     &bad_offset);
    Py_END_ALLOW_THREADS
    if (n_tokens < 0) {
        PyErr_Format(PyExc_ValueError, "document %zd: byte 0x%02x at offset %zd starts no token of the vocab", bad_doc,
                     ((const uint8_t *)data.buf)[bad_offset], bad_offset);
        goto done;
    }
    if (PyByteArray_Resize(tokens, n_tokens * (Py_ssize_t)sizeof(uint16_t)) < 0)
        goto done;
    result = PyTuple_Pack(2, tokens, sizes);
done:
    Py_XDECREF(tokens);
    Py_XDECREF(sizes);
    if (offsets.obj != NULL)
        PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    return result;
}

static void Trie_dealloc(Trie *self)
{
    if (self->id_objs != NULL) {
        for (uint32_t i = 0; i < self->n_tokens; i++)
            Py_XDECREF(self->id_objs[i]);
    }
    PyMem_Free(self->id_objs);
    PyMem_Free(self->ids);
    PyMem_Free(self->slots);
    PyMem_Free(self->slot_token);
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* Trie(tokens, ids): tokens is a list of non-empty bytes, ids a list of the same length of ints in [0, 2**32). */
static int Trie_init(Trie *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"tokens", "ids", NULL};
    PyObject *tokens, *ids;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!:Trie", kwlist, &PyList_Type, &tokens, &PyList_Type, &ids))
        return -1;
    if (self->id_objs != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Trie is already initialised");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(tokens);
    if (PyList_GET_SIZE(ids) != n) {
        PyErr_SetString(PyExc_ValueError, "tokens and ids must have the same length");
        return -1;
    }
    if (n >= (Py_ssize_t)NO_TOKEN) {
        PyErr_SetString(PyExc_ValueError, "too many tokens");
        return -1;
    }
    /* Count bytes first: the linked trie has at most one node per token byte, plus the root. */
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *tok = PyList_GET_ITEM(tokens, i);
        if (!PyBytes_Check(tok) || PyBytes_GET_SIZE(tok) == 0) {
            PyErr_Format(PyExc_ValueError, "token %zd must be non-empty bytes", i);
            return -1;
        }
        total += PyBytes_GET_SIZE(tok);
    }
    if (total >= INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "the vocab is too large for this trie");
        return -1;
    }
    self->ids = PyMem_Malloc(((size_t)n + 1) * sizeof(uint32_t));
    self->id_objs = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    BuildNode *nodes = PyMem_Malloc(((size_t)total + 1) * sizeof(BuildNode));
    if (!self->ids || !self->id_objs || !nodes) {
        PyMem_Free(nodes);
        PyErr_NoMemory();
        return -1;
    }
    uint32_t n_nodes = 1;
    memset(&nodes[0], 0, sizeof(BuildNode));
    nodes[0].token = NO_TOKEN;
    self->n_tokens = (uint32_t)n;
    self->max_id = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *id_obj = PyList_GET_ITEM(ids, i);
        unsigned long id = PyLong_AsUnsignedLong(id_obj);
        if (PyErr_Occurred() || id > UINT32_MAX) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "id %zd must be an int in [0, 2**32)", i);
            PyMem_Free(nodes);
            return -1;
        }
        self->ids[i] = (uint32_t)id;
        if (id > self->max_id)
            self->max_id = (uint32_t)id;
        self->id_objs[i] = PyLong_FromUnsignedLong(id); /* a plain int even if given an int subclass */
        if (self->id_objs[i] == NULL) {
            PyMem_Free(nodes);
            return -1;
        }

        PyObject *tok = PyList_GET_ITEM(tokens, i);
        const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(tok);
        uint32_t node = 0;
        for (Py_ssize_t j = 0; j < PyBytes_GET_SIZE(tok); j++)
            node = build_child(nodes, &n_nodes, node, b[j]);
        nodes[node].token = (uint32_t)i; /* a repeated token keeps its last id, as the reference does */
    }
    int placed = place_nodes(self, nodes, n_nodes);
    PyMem_Free(nodes);
    if (placed < 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->n_nodes = n_nodes;
    self->ready = 1;
    return 0;
}

static PyObject *Trie_get_max_id(Trie *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->max_id);
}

static PyObject *Trie_get_n_nodes(Trie *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->n_nodes);
}

static PyObject *Trie_get_n_slots(Trie *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->n_slots);
}

static PyMethodDef Trie_methods[] = {
    {"encode", (PyCFunction)Trie_encode, METH_O,
     "encode(data) -> list[int]: greedy longest-match token ids of a bytes-like object."},
    {"encode_u16", (PyCFunction)Trie_encode_u16, METH_O,
     "encode_u16(data) -> bytearray: the same ids as native-endian uint16 values."},
    {"encode_documents", (PyCFunction)Trie_encode_documents, METH_VARARGS,
     "encode_documents(data, offsets) -> (bytearray, bytearray): the ids of documents data[offsets[i]:offsets[i+1]] "
     "as uint16, each followed by 0, and each document's count (its 0 included) as int64."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Trie_getset[] = {
    {"max_id", (getter)Trie_get_max_id, NULL, "largest token id", NULL},
    {"n_nodes", (getter)Trie_get_n_nodes, NULL, "number of trie nodes, root included", NULL},
    {"n_slots", (getter)Trie_get_n_slots, NULL, "length of the double array", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Trie_slots[] = {
    {Py_tp_doc, "Byte trie over a token vocab; encode() does greedy longest match with the GIL released."},
    {Py_tp_init, Trie_init},
    {Py_tp_dealloc, Trie_dealloc},
    {Py_tp_methods, Trie_methods},
    {Py_tp_getset, Trie_getset},
    {0, NULL},
};

static PyType_Spec Trie_spec = {
    .name = "rwkv7_train._trie.Trie",
    .basicsize = sizeof(Trie),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Trie_slots,
};

static int trie_exec(PyObject *module)
{
    PyObject *type = PyType_FromSpec(&Trie_spec);
    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "Trie", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot trie_module_slots[] = {
    {Py_mod_exec, trie_exec},
    {0, NULL},
};

static struct PyModuleDef trie_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rwkv7_train._trie",
    .m_doc = "C trie for the World tokenizer (see rwkv7_train.tokenizer).",
    .m_size = 0,
    .m_slots = trie_module_slots,
};

PyMODINIT_FUNC PyInit__trie(void)
{
    return PyModuleDef_Init(&trie_module);
}
