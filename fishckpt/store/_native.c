/* fishckpt.store._native: the store's inner loops in C, over many tensors per call, with the GIL released.
 *
 * The exact check at save must prove that nothing outside the mask changed. A
 * tensor passes when every hashing chunk of it, with its masked entries reset to
 * the base's values, has the base chunk's XXH3-128 digest (docs/exactness.md).
 * The Python fallback (fishckpt/store/scan.py) copies each 4 MiB chunk into a
 * scratch buffer to reset those entries, then hashes it; the xxhash module holds
 * the GIL, so two threads cannot overlap. Here the state is streamed once in small
 * blocks: a block without masked entries is hashed where it lies, and a block with
 * some is copied to the stack, its masked entries are swapped for the base's
 * (saving the state's values, so the gather is free), and hashed from there.
 *
 * The other functions gather and scatter masked entries and copy the base while
 * hashing it, for every tensor of a state in one call (fishckpt/store/batch.py).
 *
 * Digests are byte-for-byte the ones the base file records, so the on-disk
 * format does not depend on whether this module was built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

/* Measured on the 2-core AMD EPYC dev VM over 1 GiB: copy + hash in 4 KiB blocks
 * ran at ~1.2x the cost of hashing in place. Larger blocks made glibc switch
 * memcpy to `rep movsb`, about half as fast from DRAM there; smaller ones fell
 * below XXH3's 1 KiB stripe block and slowed its streaming update. */
#define BLOCK_BYTES 4096
#define DIGEST_BYTES 16

/* Swaps one element of `size` bytes: the state's value goes to `saved`, the
 * base's into the block. Constant sizes let the compiler emit plain moves. */
static inline void swap_element(unsigned char *slot, unsigned char *saved, const unsigned char *base, Py_ssize_t size) {
    switch (size) {
    case 1: *saved = *slot; *slot = *base; break;
    case 2: memcpy(saved, slot, 2); memcpy(slot, base, 2); break;
    case 4: memcpy(saved, slot, 4); memcpy(slot, base, 4); break;
    case 8: memcpy(saved, slot, 8); memcpy(slot, base, 8); break;
    default: memcpy(saved, slot, (size_t)size); memcpy(slot, base, (size_t)size); break;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Table functions: one call works through many tensors, so a state of tens of thousands of
 * small tensors costs one Python call instead of one per tensor (docs/architecture.md, "Scale").
 *
 * A table is a set of numpy arrays, one row per tensor: raw data addresses (uint64), element
 * counts and sizes (int64), and a concatenated index with per-row start offsets. The caller
 * (fishckpt/store/batch.py) builds them from live, contiguous CPU tensors and keeps every tensor
 * alive for the call. Each function works on rows [first, last), so two threads can take halves.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer data, numels, itemsizes, index_starts, index, values; /* values: per-row value addresses */
    Py_ssize_t rows;
} table_args;

static const uint64_t *u64(const Py_buffer *b) { return (const uint64_t *)b->buf; }
static const int64_t *i64(const Py_buffer *b) { return (const int64_t *)b->buf; }

/* Checks the shapes of a table's arrays and the rows [first, last); sets ValueError and returns -1 if wrong. */
static int check_table(const char *name, const table_args *a, Py_ssize_t first, Py_ssize_t last) {
    const Py_ssize_t rows = a->data.len / 8;
    if (a->data.len % 8 || a->numels.len != rows * 8 || a->itemsizes.len != rows * 8 ||
        a->index_starts.len != (rows + 1) * 8 || a->index.len % 8 || a->values.len != rows * 8) {
        PyErr_Format(PyExc_ValueError, "%s: table arrays disagree in length", name);
        return -1;
    }
    if (first < 0 || last < first || last > rows) {
        PyErr_Format(PyExc_ValueError, "%s: rows [%zd, %zd) outside the table's %zd", name, first, last, rows);
        return -1;
    }
    const int64_t *starts = i64(&a->index_starts);
    const int64_t k = a->index.len / 8;
    for (Py_ssize_t t = first; t < last; t++) {
        const int64_t size = i64(&a->itemsizes)[t];
        if (size < 1 || size > 16 || i64(&a->numels)[t] < 0 || starts[t] < 0 || starts[t + 1] < starts[t] ||
            starts[t + 1] > k) {
            PyErr_Format(PyExc_ValueError, "%s: row %zd has an invalid size, count or index range", name, t);
            return -1;
        }
    }
    return 0;
}

static void release_table(table_args *a) {
    PyBuffer_Release(&a->data);
    PyBuffer_Release(&a->numels);
    PyBuffer_Release(&a->itemsizes);
    PyBuffer_Release(&a->index_starts);
    PyBuffer_Release(&a->index);
    PyBuffer_Release(&a->values);
}

/* How many elements ahead move_masked asks for a masked element's cache line. The indices are
 * sorted but far apart (a 0.5% mask: one element every ~800 bytes), so each element is a cache
 * miss, often a TLB miss; without prefetching the loop waits on memory one element at a time. */
#define PREFETCH_AHEAD 16

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address, write) __builtin_prefetch((address), (write))
#else
#define PREFETCH(address, write) ((void)(address))
#endif

/* The loop of move_masked for one element size. With SIZE a constant (1, 2, 4 or 8), compilers
 * turn each memcpy into one load and one store; any other size goes through a real memcpy. */
#define MOVE_LOOP(SIZE)                                                                      \
    for (int64_t j = begin; j < end; j++) {                                                  \
        const int64_t position = index[j];                                                   \
        if (position <= previous || position >= numel) {                                     \
            return t;                                                                        \
        }                                                                                    \
        previous = position;                                                                 \
        if (j + PREFETCH_AHEAD < end) {                                                      \
            const int64_t ahead = index[j + PREFETCH_AHEAD];                                 \
            if (ahead > position && ahead < numel) {                                         \
                PREFETCH(tensor + (size_t)ahead * (SIZE), to_tensor);                        \
            }                                                                                \
        }                                                                                    \
        unsigned char *element = tensor + (size_t)position * (SIZE);                         \
        if (to_tensor) {                                                                     \
            memcpy(element, values, (SIZE));                                                 \
        } else {                                                                             \
            memcpy(values, element, (SIZE));                                                 \
        }                                                                                    \
        values += (SIZE);                                                                    \
    }

/* Masked elements scattered before they are read back: few enough (4096 cache lines, 256 KiB)
 * that the read-back finds them in cache, so checking the writes costs little beside them. */
#define READ_BACK_ELEMENTS 4096

#define COMPARE_LOOP(SIZE)                                                                   \
    for (int64_t j = begin; j < end; j++) {                                                  \
        if (memcmp(tensor + (size_t)index[j] * (SIZE), expected, (SIZE)) != 0) {             \
            *unwritten = t;                                                                  \
            return -1;                                                                       \
        }                                                                                    \
        expected += (SIZE);                                                                  \
    }

/* Moves the masked elements of rows [first, last) between the tensors and their value buffers.
 * Returns the row of the first index out of order or out of range, or -1. With `unwritten`
 * (a scatter), each block of READ_BACK_ELEMENTS is read back and compared with the values just
 * after it is written, and *unwritten is set to the first row whose memory does not hold them. */
static Py_ssize_t move_masked(const table_args *a, Py_ssize_t first, Py_ssize_t last, int to_tensor,
                              Py_ssize_t *unwritten) {
    const int64_t *starts = i64(&a->index_starts);
    const int64_t *index = i64(&a->index);
    for (Py_ssize_t t = first; t < last; t++) {
        const size_t size = (size_t)i64(&a->itemsizes)[t];
        const int64_t numel = i64(&a->numels)[t];
        unsigned char *tensor = (unsigned char *)(uintptr_t)u64(&a->data)[t];
        unsigned char *values = (unsigned char *)(uintptr_t)u64(&a->values)[t];
        const int64_t block = unwritten != NULL ? READ_BACK_ELEMENTS : starts[t + 1] - starts[t];
        int64_t previous = -1;
        if (tensor == NULL) {
            continue; /* a row the caller handles itself */
        }
        for (int64_t begin = starts[t]; begin < starts[t + 1]; begin += block) {
            const int64_t end = starts[t + 1] - begin > block ? begin + block : starts[t + 1];
            const unsigned char *expected = values;
            switch (size) {
            case 1: MOVE_LOOP(1) if (unwritten != NULL) { COMPARE_LOOP(1) } break;
            case 2: MOVE_LOOP(2) if (unwritten != NULL) { COMPARE_LOOP(2) } break;
            case 4: MOVE_LOOP(4) if (unwritten != NULL) { COMPARE_LOOP(4) } break;
            case 8: MOVE_LOOP(8) if (unwritten != NULL) { COMPARE_LOOP(8) } break;
            default: MOVE_LOOP(size) if (unwritten != NULL) { COMPARE_LOOP(size) } break;
            }
        }
    }
    return -1;
}

/* gather_table, scatter_table and scatter_checked_table (which `check`s: returns an int, not None). */
static PyObject *move_table(PyObject *args, const char *format, const char *name, int to_tensor, int check) {
    table_args a;
    Py_ssize_t first, last;
    if (!PyArg_ParseTuple(args, format, &first, &last, &a.data, &a.numels, &a.itemsizes, &a.index_starts, &a.index,
                          &a.values)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (check_table(name, &a, first, last) == 0) {
        Py_ssize_t bad, unwritten = -1;
        Py_BEGIN_ALLOW_THREADS
        bad = move_masked(&a, first, last, to_tensor, check ? &unwritten : NULL);
        Py_END_ALLOW_THREADS
        if (bad >= 0) {
            PyErr_Format(PyExc_ValueError, "%s: row %zd has an index out of order or out of range", name, bad);
        } else {
            result = check ? PyLong_FromSsize_t(unwritten) : Py_NewRef(Py_None);
        }
    }
    release_table(&a);
    return result;
}

PyDoc_STRVAR(gather_table_doc,
"gather_table(first, last, data, numels, itemsizes, index_starts, index, values, /) -> None\n"
"\n"
"For each row t in [first, last): copies the elements of tensor data[t] at index[index_starts[t]:\n"
"index_starts[t+1]] (strictly increasing, below numels[t]) to the buffer at values[t], in order.\n"
"data and values hold raw addresses (uint64; a row whose data is 0 is skipped); the rest are int64.\n"
"Runs without the GIL.");

static PyObject *gather_table(PyObject *module, PyObject *args) {
    (void)module;
    return move_table(args, "nny*y*y*y*y*y*:gather_table", "gather_table", 0, 0);
}

PyDoc_STRVAR(scatter_table_doc,
"scatter_table(first, last, data, numels, itemsizes, index_starts, index, values, /) -> None\n"
"\n"
"The inverse of gather_table: writes the buffer at values[t] into tensor data[t] at its index.");

static PyObject *scatter_table(PyObject *module, PyObject *args) {
    (void)module;
    return move_table(args, "nny*y*y*y*y*y*:scatter_table", "scatter_table", 1, 0);
}

PyDoc_STRVAR(scatter_checked_table_doc,
"scatter_checked_table(first, last, data, numels, itemsizes, index_starts, index, values, /) -> int\n"
"\n"
"scatter_table, reading back every element after writing it (a few thousand at a time, while\n"
"they are in cache). Returns the first row whose memory does not hold what was written, or -1.");

static PyObject *scatter_checked_table(PyObject *module, PyObject *args) {
    (void)module;
    return move_table(args, "nny*y*y*y*y*y*:scatter_checked_table", "scatter_checked_table", 1, 1);
}

/* Appends (row, chunk) to a growing list of pairs; returns -1 when memory runs out. */
typedef struct {
    Py_ssize_t *pairs;
    Py_ssize_t count, capacity;
} pair_list;

static int add_pair(pair_list *list, Py_ssize_t row, Py_ssize_t chunk) {
    if (list->count == list->capacity) {
        Py_ssize_t capacity = list->capacity ? 2 * list->capacity : 64;
        Py_ssize_t *grown = PyMem_RawRealloc(list->pairs, (size_t)capacity * 2 * sizeof(Py_ssize_t));
        if (grown == NULL) {
            return -1;
        }
        list->pairs = grown;
        list->capacity = capacity;
    }
    list->pairs[2 * list->count] = row;
    list->pairs[2 * list->count + 1] = chunk;
    list->count++;
    return 0;
}

static PyObject *pairs_to_list(pair_list *list) {
    PyObject *result = PyList_New(list->count);
    for (Py_ssize_t i = 0; result != NULL && i < list->count; i++) {
        PyObject *pair = Py_BuildValue("(nn)", list->pairs[2 * i], list->pairs[2 * i + 1]);
        if (pair == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, pair);
    }
    return result;
}

static int digest_matches(XXH3_state_t *state, const unsigned char *expected) {
    XXH128_canonical_t digest;
    XXH128_canonicalFromHash(&digest, XXH3_128bits_digest(state));
    return memcmp(digest.digest, expected, DIGEST_BYTES) == 0;
}

PyDoc_STRVAR(scan_table_doc,
"scan_table(first, last, data, numels, itemsizes, index_starts, index, values, base_values,\n"
"           chunk_elements, digest_starts, digests, /) -> list[tuple[int, int]]\n"
"\n"
"masked_scan for every row t in [first, last) of a table: hashes each chunk of tensor data[t]\n"
"(chunk_elements[t] elements) with its masked elements reset to those at base_values[t], gathers\n"
"the tensor's own masked elements to values[t], and compares with digests[digest_starts[t]:\n"
"digest_starts[t+1]] (16 bytes each). Returns the (row, chunk) pairs that differ. No GIL.");

static PyObject *scan_table(PyObject *module, PyObject *args) {
    (void)module;
    table_args a;
    Py_buffer base_values, chunk_elements, digest_starts, chunk_digests;
    Py_ssize_t first, last;
    if (!PyArg_ParseTuple(args, "nny*y*y*y*y*y*y*y*y*y*:scan_table", &first, &last, &a.data, &a.numels,
                          &a.itemsizes, &a.index_starts, &a.index, &a.values, &base_values, &chunk_elements,
                          &digest_starts, &chunk_digests)) {
        return NULL;
    }
    PyObject *result = NULL;
    pair_list differing = {NULL, 0, 0};
    Py_ssize_t bad_row = -1, oom = 0;
    if (check_table("scan_table", &a, first, last) < 0) {
        goto release;
    }
    const Py_ssize_t rows = a.data.len / 8;
    if (base_values.len != rows * 8 || chunk_elements.len != rows * 8 || digest_starts.len != (rows + 1) * 8) {
        PyErr_SetString(PyExc_ValueError, "scan_table: table arrays disagree in length");
        goto release;
    }
    for (Py_ssize_t t = first; t < last; t++) {
        const int64_t per = i64(&chunk_elements)[t], numel = i64(&a.numels)[t];
        const int64_t chunks = numel == 0 ? 1 : (numel - 1) / (per > 0 ? per : 1) + 1;
        const int64_t d0 = i64(&digest_starts)[t], d1 = i64(&digest_starts)[t + 1];
        if (per < 1 || d0 < 0 || d1 - d0 != chunks || d1 * DIGEST_BYTES > chunk_digests.len) {
            PyErr_Format(PyExc_ValueError, "scan_table: row %zd has an invalid chunk layout", t);
            goto release;
        }
    }

    Py_BEGIN_ALLOW_THREADS
    XXH3_state_t state;
    unsigned char block[BLOCK_BYTES];
    const int64_t *starts = i64(&a.index_starts);
    const int64_t *index = i64(&a.index);
    for (Py_ssize_t t = first; t < last && bad_row < 0 && !oom; t++) {
        const Py_ssize_t itemsize = (Py_ssize_t)i64(&a.itemsizes)[t];
        const int64_t numel = i64(&a.numels)[t], per = i64(&chunk_elements)[t];
        const int64_t chunks = numel == 0 ? 1 : (numel - 1) / per + 1;
        const unsigned char *source = (const unsigned char *)(uintptr_t)u64(&a.data)[t];
        if (source == NULL) {
            continue; /* a row the caller handles itself */
        }
        unsigned char *saved = (unsigned char *)(uintptr_t)u64(&a.values)[t];
        const unsigned char *base = (const unsigned char *)(uintptr_t)u64(&base_values)[t];
        const unsigned char *expected = (const unsigned char *)chunk_digests.buf + i64(&digest_starts)[t] * DIGEST_BYTES;
        const Py_ssize_t block_elements = BLOCK_BYTES / itemsize;
        int64_t j = starts[t], previous = -1;
        const int64_t k_end = starts[t + 1];
        for (int64_t chunk = 0; chunk < chunks && bad_row < 0; chunk++) {
            const int64_t start = chunk * per;
            const int64_t stop = numel - start < per ? numel : start + per;
            XXH3_128bits_reset(&state);
            for (int64_t low = start; low < stop && bad_row < 0;) {
                const int64_t high = stop - low < block_elements ? stop : low + block_elements;
                const size_t nbytes = (size_t)(high - low) * (size_t)itemsize;
                if (j < k_end && index[j] < high) {
                    memcpy(block, source + low * itemsize, nbytes);
                    for (; j < k_end && index[j] < high; j++) {
                        const int64_t position = index[j];
                        if (position <= previous || position < low) {
                            bad_row = t;
                            break;
                        }
                        swap_element(block + (position - low) * itemsize, saved, base, itemsize);
                        saved += itemsize;
                        base += itemsize;
                        previous = position;
                    }
                    XXH3_128bits_update(&state, block, nbytes);
                } else {
                    XXH3_128bits_update(&state, source + low * itemsize, nbytes);
                }
                low = high;
            }
            if (bad_row < 0 && !digest_matches(&state, expected + chunk * DIGEST_BYTES) && add_pair(&differing, t, chunk) < 0) {
                oom = 1;
                break;
            }
        }
        if (bad_row < 0 && j < k_end) {
            bad_row = t; /* positions at or beyond numel were never reached */
        }
    }
    Py_END_ALLOW_THREADS

    if (oom) {
        PyErr_NoMemory();
    } else if (bad_row >= 0) {
        PyErr_Format(PyExc_ValueError, "scan_table: row %zd has an index out of order or out of range", bad_row);
    } else {
        result = pairs_to_list(&differing);
    }
release:
    PyMem_RawFree(differing.pairs);
    release_table(&a);
    PyBuffer_Release(&base_values);
    PyBuffer_Release(&chunk_elements);
    PyBuffer_Release(&digest_starts);
    PyBuffer_Release(&chunk_digests);
    return result;
}

/* Copy blocks small enough to be hashed while still in cache, large enough for memcpy's fast paths. */
#define COPY_BLOCK_BYTES (256 * 1024)

PyDoc_STRVAR(copy_check_doc,
"copy_check(first, last, targets, sources, nbytes, chunk_bytes, digest_starts, digests, verify, /)\n"
"    -> list[tuple[int, int]]\n"
"\n"
"For each row t in [first, last) whose source is not 0: copies nbytes[t] bytes from sources[t] to\n"
"targets[t] (if targets[t] is not 0) and, if verify, hashes each chunk of chunk_bytes[t] bytes of\n"
"what was copied (of the source when there is no target), comparing with digests[digest_starts[t]:].\n"
"Returns (row, first failing chunk) for each row that fails. Runs without the GIL.");

static PyObject *copy_check(PyObject *module, PyObject *args) {
    (void)module;
    Py_ssize_t first, last;
    Py_buffer targets, sources, nbytes, chunk_bytes, digest_starts, chunk_digests;
    int verify;
    if (!PyArg_ParseTuple(args, "nny*y*y*y*y*y*p:copy_check", &first, &last, &targets, &sources, &nbytes,
                          &chunk_bytes, &digest_starts, &chunk_digests, &verify)) {
        return NULL;
    }
    PyObject *result = NULL;
    pair_list failing = {NULL, 0, 0};
    int oom = 0;
    const Py_ssize_t rows = sources.len / 8;
    if (sources.len % 8 || targets.len != rows * 8 || nbytes.len != rows * 8 || chunk_bytes.len != rows * 8 ||
        digest_starts.len != (rows + 1) * 8 || first < 0 || last < first || last > rows) {
        PyErr_SetString(PyExc_ValueError, "copy_check: table arrays disagree in length, or rows out of range");
        goto release;
    }
    for (Py_ssize_t t = first; t < last; t++) {
        const int64_t size = i64(&nbytes)[t], per = i64(&chunk_bytes)[t];
        const int64_t d0 = i64(&digest_starts)[t], d1 = i64(&digest_starts)[t + 1];
        const int64_t chunks = size == 0 ? 1 : (size - 1) / (per > 0 ? per : 1) + 1;
        if (size < 0 || per < 1 || d0 < 0 || d1 - d0 != chunks || d1 * DIGEST_BYTES > chunk_digests.len) {
            PyErr_Format(PyExc_ValueError, "copy_check: row %zd has an invalid chunk layout", t);
            goto release;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    XXH3_state_t state;
    for (Py_ssize_t t = first; t < last && !oom; t++) {
        const int64_t size = i64(&nbytes)[t], per = i64(&chunk_bytes)[t];
        const unsigned char *source = (const unsigned char *)(uintptr_t)u64(&sources)[t];
        unsigned char *target = (unsigned char *)(uintptr_t)u64(&targets)[t];
        if (source == NULL) {
            continue; /* a row the caller handles itself */
        }
        if (!verify) {
            if (target != NULL && size > 0) {
                memcpy(target, source, (size_t)size);
            }
            continue;
        }
        const unsigned char *expected = (const unsigned char *)chunk_digests.buf + i64(&digest_starts)[t] * DIGEST_BYTES;
        const int64_t chunks = size == 0 ? 1 : (size - 1) / per + 1;
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            const int64_t start = chunk * per;
            const int64_t stop = size - start < per ? size : start + per;
            XXH3_128bits_reset(&state);
            for (int64_t low = start; low < stop;) {
                const int64_t high = stop - low < COPY_BLOCK_BYTES ? stop : low + COPY_BLOCK_BYTES;
                if (target != NULL) {
                    memcpy(target + low, source + low, (size_t)(high - low));
                    XXH3_128bits_update(&state, target + low, (size_t)(high - low));
                } else {
                    XXH3_128bits_update(&state, source + low, (size_t)(high - low));
                }
                low = high;
            }
            if (!digest_matches(&state, expected + chunk * DIGEST_BYTES)) {
                if (add_pair(&failing, t, chunk) < 0) {
                    oom = 1;
                }
                if (target != NULL && stop < size) { /* finish the copy; the caller raises anyway */
                    memcpy(target + stop, source + stop, (size_t)(size - stop));
                }
                break;
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (oom) {
        PyErr_NoMemory();
    } else {
        result = pairs_to_list(&failing);
    }
release:
    PyMem_RawFree(failing.pairs);
    PyBuffer_Release(&targets);
    PyBuffer_Release(&sources);
    PyBuffer_Release(&nbytes);
    PyBuffer_Release(&chunk_bytes);
    PyBuffer_Release(&digest_starts);
    PyBuffer_Release(&chunk_digests);
    return result;
}

static PyMethodDef native_methods[] = {
    {"scan_table", scan_table, METH_VARARGS, scan_table_doc},
    {"gather_table", gather_table, METH_VARARGS, gather_table_doc},
    {"scatter_table", scatter_table, METH_VARARGS, scatter_table_doc},
    {"scatter_checked_table", scatter_checked_table, METH_VARARGS, scatter_checked_table_doc},
    {"copy_check", copy_check, METH_VARARGS, copy_check_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fishckpt.store._native",
    .m_doc = "The store's inner loops in C (see fishckpt/store/batch.py and scan.py for the pure-Python equivalents).",
    .m_size = 0,
    .m_methods = native_methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&native_module); }
