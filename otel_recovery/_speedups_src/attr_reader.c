/* AttrReader: an attribute of the instances a Layer is called on (a psycopg cursor's
 * connection, an asyncpg connection's class and address), read without the attribute
 * protocol where its outcome is known.
 *
 * Why: getattr walks the type's method cache, the descriptor it finds and its getter, code
 * and data that are cold between two client calls. Reading a cursor's `_conn` slot by its
 * offset instead took a psycopg statement's compiled layer from 799 instructions and 143
 * simulated L1 misses to 617 and 111 (benchmarks/layer_own_cost.py, 2026-12-02).
 *
 * Where the first definition of the name on the type's MRO is a `__slots__` member, or
 * object's own `__class__`, getattr's answer is the slot's content, or the type: one load.
 * The reader learns that per type and keeps it while the type's version tag is the one it
 * learned under: CPython gives a class a new tag whenever its attributes, or its bases',
 * change (valid_version_tag, speedups.h), so an assigned property or a new
 * __getattribute__ is seen at the next call. A metaclass with its own mro() could put a
 * class that is not a base on the MRO, whose changes leave the tag as it was: such classes
 * are read by getattr. An attribute in the instance's __dict__ (a redis-py client's
 * connection_pool) has no shortcut either: the reader remembers that too, and asks getattr.
 * It remembers two types, the last two it read: a site serves every subclass that inherits
 * it (psycopg's Cursor and ClientCursor share execute), and an application may use two in
 * turn.
 *
 * Learning looks names up in the class dicts, which may run Python code (a non-str key's
 * __eq__ on a hash collision) that changes the instance's class or the type: it holds what
 * it walks and keeps nothing unless the instance's type and its tag are as they were. */
#include "speedups.h"

static void
attr_way_forget(AttrWay *way)
{
    way->type = NULL;
    way->tag = 0;
    way->how = ATTR_GETATTR;
}

/* `name`: a str (the caller checked), or NULL for a reader that is never read. */
void
attr_reader_init(AttrReader *reader, PyObject *name)
{
    reader->name = Py_XNewRef(name);
    attr_way_forget(&reader->last);
    attr_way_forget(&reader->before);
}

int
attr_reader_traverse(AttrReader *reader, visitproc visit, void *arg)
{
    Py_VISIT(reader->name);
    Py_VISIT(reader->last.type);
    Py_VISIT(reader->before.type);
    return 0;
}

void
attr_reader_clear(AttrReader *reader)
{
    Py_CLEAR(reader->name);
    Py_CLEAR(reader->last.type);
    Py_CLEAR(reader->before.type);
    reader->last.tag = reader->before.tag = 0;
}

/* The first class on `type`'s MRO whose dict has `name` is `expected`: 1 or 0; -1 on error. */
static int
first_defined_by(PyTypeObject *type, PyObject *name, PyTypeObject *expected)
{
    PyObject *definer, *value;
    int found = mro_find(type, name, &definer, &value);
    int answer = found == 1 ? definer == (PyObject *)expected : found;
    Py_XDECREF(definer);
    Py_XDECREF(value);
    return answer;
}

/* How getattr answers `name` on instances of `type` while its version tag stays: a slot's
 * offset, ATTR_TYPE, or ATTR_GETATTR when only getattr can say. */
static Py_ssize_t
attr_way(PyTypeObject *type, PyObject *name)
{
    /* A metaclass's own mro() may put a class that is not a base on the MRO, whose changes
     * then leave the type's tag as it was: getattr only. asyncpg's metaclass has none. */
    PyTypeObject *meta = Py_TYPE(type);
    if (meta != &PyType_Type) {
        int plain = first_defined_by(meta, str_mro, &PyType_Type);
        if (plain != 1) {
            PyErr_Clear();
            return ATTR_GETATTR;
        }
    }
    SlotReader slot;
    slot_reader_for_type(&slot, type, name); /* checks for the generic getattr itself */
    if (slot.offset >= 0) {
        return slot.offset;
    }
    if (type->tp_getattro != PyObject_GenericGetAttr || !PyUnicode_CheckExact(name) ||
        PyUnicode_Compare(name, str_dunder_class) != 0) {
        return ATTR_GETATTR;
    }
    int object_only = first_defined_by(type, name, &PyBaseObject_Type);
    if (object_only < 0) {
        PyErr_Clear();
        return ATTR_GETATTR;
    }
    return object_only ? ATTR_TYPE : ATTR_GETATTR;
}

COLD PyObject *
attr_read_learning(AttrReader *reader, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == reader->before.type && valid_version_tag(type) == reader->before.tag) {
        AttrWay last = reader->last; /* the type read before is read again: swap */
        reader->last = reader->before;
        reader->before = last;
        return attr_read(reader, obj); /* its fast way now, which never comes back here */
    }
    /* getattr first: it may run Python code (a property, another thread, this layer
     * again), and it gives the type its version tag if it had none */
    PyObject *value = PyObject_GetAttr(obj, reader->name);
    if (value == NULL) {
        return NULL;
    }
    type = Py_TYPE(obj);
    unsigned int tag = valid_version_tag(type);
    if (tag == 0) {
        return value; /* no tag to keep an answer valid by: getattr's, every time */
    }
    Py_INCREF(type); /* attr_way may run code that moves obj to another class */
    Py_ssize_t how = attr_way(type, reader->name);
    if (Py_TYPE(obj) != type || valid_version_tag(type) != tag) {
        Py_DECREF(type); /* changed while it was read: the next call learns again */
        return value;
    }
    PyTypeObject *forgotten = reader->before.type;
    reader->before = reader->last;
    reader->last.type = type; /* the reference taken above */
    reader->last.tag = tag;
    reader->last.how = how;
    Py_XDECREF(forgotten); /* last: releasing a type may run code */
    return value;
}
