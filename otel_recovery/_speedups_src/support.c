/* The small machinery the runner and the layers share: arguments as the caller gave them,
 * the exception being handled, __slots__ members read at their offsets, the clock. */
#include "speedups.h"

/* Interned by module.c (declared in speedups.h). */
PyObject *str_active, *str_permit_all, *str_tally, *str_bucket_end,
    *str_can_execute, *str_record_call, *str_record_success, *str_release, *str_enabled,
    *str_seen, *str_run, *str_statuses, *str_method, *str_url, *str_mro, *str_dunder_class,
    *kw_release_false;
PyObject *time_monotonic;

/* ------------------------------------------------------------------------------------ */
/* Arguments as the caller gave them: a vector (from a Layer) or a tuple and a dict (from
 * Python). The tuple and dict are built only when a slow path needs them. */

/* The call as a compiled layer received it: on to `fn` with the caller's vector. Its own
 * function, never inlined, so benchmarks/layer_own_cost.py can leave it out of the count. */
HOT NOINLINE PyObject *
call_vector(PyObject *fn, CallArgs *ca)
{
    return PyObject_Vectorcall(fn, ca->argv, (size_t)ca->nargs, ca->kwnames);
}

/* The call as Python gave it to a runner: fn(*args, **kwargs). */
NOINLINE PyObject *
call_with_tuple(PyObject *fn, CallArgs *ca)
{
    if (PyDict_GET_SIZE(ca->kwargs) == 0) {
        return PyObject_Call(fn, ca->args, NULL);
    }
    if (PyVectorcall_Function(fn) != NULL) {
        return PyObject_Call(fn, ca->args, ca->kwargs); /* unpacked: the callee gets a copy */
    }
    /* fn(*args, **kwargs) passes a fresh dict: a tp_call callee may mutate what it gets */
    PyObject *copy = PyDict_Copy(ca->kwargs);
    if (copy == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Call(fn, ca->args, copy);
    Py_DECREF(copy);
    return result;
}

/* The pending error, normalized with its traceback; a new reference. */
COLD PyObject *
fetch_error(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

/* A new error is set while (type, value, traceback), fetched and normalized, was being
 * handled: the new one propagates with the old one as its __context__, as in Python.
 * Steals the three references. */
COLD void
chain_to_handled(PyObject *type, PyObject *value, PyObject *traceback)
{
    PyObject *new_type, *new_value, *new_traceback;
    PyErr_Fetch(&new_type, &new_value, &new_traceback);
    PyErr_NormalizeException(&new_type, &new_value, &new_traceback);
    if (new_value != value) {
        PyException_SetContext(new_value, value); /* steals value */
    }
    else {
        Py_DECREF(value);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    PyErr_Restore(new_type, new_value, new_traceback);
}

/* The positional arguments of a vector as a tuple. */
static PyObject *
args_tuple(PyObject *const *argv, Py_ssize_t nargs)
{
    PyObject *args = PyTuple_New(nargs);
    if (args == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyTuple_SET_ITEM(args, i, Py_NewRef(argv[i]));
    }
    return args;
}

COLD int
callargs_materialize(CallArgs *ca)
{
    if (ca->args != NULL) {
        return 0;
    }
    PyObject *args = args_tuple(ca->argv, ca->nargs);
    if (args == NULL) {
        return -1;
    }
    PyObject *kwargs = PyDict_New();
    if (kwargs == NULL) {
        Py_DECREF(args);
        return -1;
    }
    Py_ssize_t nkw = ca->kwnames == NULL ? 0 : PyTuple_GET_SIZE(ca->kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(ca->kwnames, i), ca->argv[ca->nargs + i]) < 0) {
            Py_DECREF(args);
            Py_DECREF(kwargs);
            return -1;
        }
    }
    ca->args = args;
    ca->kwargs = kwargs;
    ca->owned = 1;
    return 0;
}

HOT void
callargs_release(CallArgs *ca)
{
    if (ca->owned) {
        Py_CLEAR(ca->args);
        Py_CLEAR(ca->kwargs);
    }
}

/* ------------------------------------------------------------------------------------ */
/* Reading an attribute kept in a __slots__ slot without the attribute protocol.
 *
 * Most of a generic getattr is finding out *where* the attribute lives; for the policy
 * objects of a runner that answer never changes, so it is found once: when the object's
 * class resolves the name to a __slots__ member, the value is read at the member's offset
 * while the object's class is still that class. Anything else uses PyObject_GetAttr. */

int
mro_find(PyTypeObject *type, PyObject *name, PyObject **definer, PyObject **value)
{
    *definer = *value = NULL;
    PyObject *mro = type->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro)) {
        return 0;
    }
    Py_INCREF(mro); /* a lookup may run code (a key's __eq__) that gives the type another */
    int found = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro) && found == 0; i++) {
        PyObject *base = PyTuple_GET_ITEM(mro, i);
        PyObject *dict = PyType_Check(base) ? ((PyTypeObject *)base)->tp_dict : NULL;
        PyObject *held = dict == NULL ? NULL : PyDict_GetItemWithError(dict, name);
        if (held != NULL) {
            *definer = Py_NewRef(base);
            *value = Py_NewRef(held);
            found = 1;
        }
        else if (PyErr_Occurred()) {
            found = -1;
        }
    }
    Py_DECREF(mro);
    return found;
}

void
slot_reader_for_type(SlotReader *reader, PyTypeObject *type, PyObject *name)
{
    reader->type = NULL;
    reader->offset = -1;
    reader->name = name;
    if (type->tp_getattro != PyObject_GenericGetAttr) {
        return;
    }
    PyObject *definer, *found;
    int defined = mro_find(type, name, &definer, &found);
    if (defined < 0) {
        PyErr_Clear();
        return;
    }
    /* the first definition on the MRO decides, as getattr's does */
    if (defined == 1 && Py_TYPE(found) == &PyMemberDescr_Type &&
        PyType_IsSubtype(type, PyDescr_TYPE(found))) {
        PyMemberDef *member = ((PyMemberDescrObject *)found)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READ_RESTRICTED)) {
            reader->type = type;
            reader->offset = member->offset;
        }
    }
    Py_XDECREF(definer);
    Py_XDECREF(found);
}

void
slot_reader_init(SlotReader *reader, PyObject *obj, PyObject *name)
{
    if (obj == NULL || obj == Py_None) {
        reader->type = NULL;
        reader->offset = -1;
        reader->name = name;
        return;
    }
    slot_reader_for_type(reader, Py_TYPE(obj), name);
}

/* slot_read's way when the reader cannot read the slot: the attribute protocol. */
COLD PyObject *
slot_read_generic(SlotReader *reader, PyObject *obj)
{
    return PyObject_GetAttr(obj, reader->name);
}

/* The truth of a new reference (stolen), -1 for NULL (the error is set) or on error. */
COLD int
truth_generic(PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* Call method(), discarding its result; -1 on error. */
COLD int
call_method_discard(PyObject *obj, PyObject *name)
{
    PyObject *result = PyObject_CallMethodNoArgs(obj, name);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}
