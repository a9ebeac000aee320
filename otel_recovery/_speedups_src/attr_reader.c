/* AttrReader: an attribute of the instances a Layer is called on (a psycopg cursor's
 * connection, an asyncpg connection's class and address), read without the attribute
 * protocol where its outcome is known.
 *
 * Why: getattr walks the type's method cache, the descriptor it finds and its getter, code
 * and data that are cold between two client calls. Reading a cursor's `_conn` slot by its
 * offset instead took a psycopg statement's compiled layer from 799 instructions and 143
 * simulated L1 misses to 617 and 113 (benchmarks/layer_own_cost.py, 2026-12-02).
 *
 * Where the first definition of the name on the type's MRO is a `__slots__` member, or
 * object's own `__class__`, getattr's answer is the slot's content, or the type: one load. The reader learns that per type and keeps it
 * while the type's version tag is the one it learned under: CPython gives a class a new tag
 * whenever its attributes, or its bases', change (valid_version_tag, speedups.h), so an
 * assigned property or a new __getattribute__ is seen at the next call. An attribute in the
 * instance's __dict__ (a redis-py client's connection_pool) has no such shortcut: the reader
 * remembers that too, and asks getattr. */
#include "speedups.h"

/* `name`: a str (the caller checked), or NULL for a reader that is never read. */
void
attr_reader_init(AttrReader *reader, PyObject *name)
{
    reader->name = Py_XNewRef(name);
    reader->type = NULL;
    reader->tag = 0;
    reader->how = ATTR_GETATTR;
}

int
attr_reader_traverse(AttrReader *reader, visitproc visit, void *arg)
{
    Py_VISIT(reader->name);
    Py_VISIT(reader->type);
    return 0;
}

void
attr_reader_clear(AttrReader *reader)
{
    Py_CLEAR(reader->name);
    Py_CLEAR(reader->type);
    reader->tag = 0;
}

/* No class on the MRO before `object` defines `name`; -1 on error. */
static int
only_object_defines(PyTypeObject *type, PyObject *name)
{
    PyObject *mro = type->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyObject *base = PyTuple_GET_ITEM(mro, i);
        PyObject *dict = PyType_Check(base) ? ((PyTypeObject *)base)->tp_dict : NULL;
        if (dict == NULL) {
            return 0;
        }
        int found = PyDict_Contains(dict, name);
        if (found != 0) {
            return found < 0 ? -1 : base == (PyObject *)&PyBaseObject_Type;
        }
    }
    return 0;
}

/* How getattr answers `name` on instances of `type` while its attributes stay as they are:
 * a slot's offset, ATTR_TYPE, or ATTR_GETATTR when only getattr can say. */
static Py_ssize_t
attr_way(PyTypeObject *type, PyObject *name)
{
    SlotReader slot;
    slot_reader_for_type(&slot, type, name); /* checks for the generic getattr itself */
    if (slot.offset >= 0) {
        return slot.offset;
    }
    if (type->tp_getattro != PyObject_GenericGetAttr ||
        !PyUnicode_CheckExact(name) || PyUnicode_CompareWithASCIIString(name, "__class__") != 0) {
        return ATTR_GETATTR;
    }
    int object_only = only_object_defines(type, name);
    if (object_only < 0) {
        PyErr_Clear();
        return ATTR_GETATTR;
    }
    return object_only ? ATTR_TYPE : ATTR_GETATTR;
}

COLD PyObject *
attr_read_learning(AttrReader *reader, PyObject *obj)
{
    /* getattr first: it may run Python code (a property, another thread, this layer
     * again), and it gives the type its version tag if it had none */
    PyObject *value = PyObject_GetAttr(obj, reader->name);
    if (value == NULL) {
        return NULL;
    }
    PyTypeObject *type = Py_TYPE(obj);
    unsigned int tag = valid_version_tag(type);
    if (tag == 0) {
        return value; /* no tag to keep the answer valid by: ask getattr every time */
    }
    Py_ssize_t how = attr_way(type, reader->name);
    if (valid_version_tag(type) != tag) {
        return value; /* the type changed while it was read: learn at the next call */
    }
    PyTypeObject *learned_before = reader->type;
    reader->type = (PyTypeObject *)Py_NewRef((PyObject *)type);
    reader->tag = tag;
    reader->how = how;
    Py_XDECREF(learned_before); /* last: releasing a type may run code */
    return value;
}
