/* What Layer and HttpLayer share: their head, binding like a function, the suppression check. */
#include "speedups.h"

int
layer_head_init(LayerHead *head, PyObject *slow, PyObject *original, PyObject *patches,
                PyObject *context_var, PyObject *suppress_keys)
{
    if (!PyContextVar_CheckExact(context_var)) {
        PyErr_SetString(PyExc_TypeError, "a layer's context_var must be a contextvars.ContextVar");
        return -1;
    }
    if (!PyTuple_Check(suppress_keys)) {
        PyErr_SetString(PyExc_TypeError, "a layer's suppress_keys must be a tuple of str");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(suppress_keys); i++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(suppress_keys, i))) {
            PyErr_SetString(PyExc_TypeError, "a layer's suppress_keys must be a tuple of str");
            return -1;
        }
    }
    /* the Python layer's module marks the layer as ours (instrumentors/_wrapping.py) */
    PyObject *dict = PyDict_New();
    PyObject *module = dict == NULL ? NULL : PyObject_GetAttrString(slow, "__module__");
    if (module == NULL || PyDict_SetItemString(dict, "__module__", module) < 0) {
        Py_XDECREF(module);
        Py_XDECREF(dict);
        return -1;
    }
    Py_DECREF(module);
    head->dict = dict;
    head->slow = Py_NewRef(slow);
    head->original = Py_NewRef(original);
    head->patches = Py_NewRef(patches);
    head->context_var = Py_NewRef(context_var);
    head->suppress_keys = Py_NewRef(suppress_keys);
    slot_reader_init(&head->enabled, patches, str_enabled);
    return 0;
}

int
layer_head_traverse(LayerHead *head, visitproc visit, void *arg)
{
    Py_VISIT(head->dict);
    Py_VISIT(head->slow);
    Py_VISIT(head->original);
    Py_VISIT(head->patches);
    Py_VISIT(head->context_var);
    Py_VISIT(head->suppress_keys);
    return 0;
}

void
layer_head_clear(LayerHead *head)
{
    Py_CLEAR(head->dict);
    Py_CLEAR(head->slow);
    Py_CLEAR(head->original);
    Py_CLEAR(head->patches);
    Py_CLEAR(head->context_var);
    Py_CLEAR(head->suppress_keys);
}

/* Every case but the remembered one: the Python layer. Its own cold function (never
 * inlined) so benchmarks/layer_own_cost.py can leave it out of the compiled path's count. */
COLD NOINLINE PyObject *
layer_call_slow(LayerHead *head, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(head->slow, argv, nargsf, kwnames);
}

/* The remembered call raised `Exception`: "except Exception as error:
 * explain(plan, error); raise". NULL with the error (or explain's BaseException, chained to
 * it) set. */
COLD PyObject *
explain_error(PyObject *explain, PyObject *plan)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *call_args[2] = {plan, value};
    PyObject *ignored = PyObject_Vectorcall(explain, call_args, 2, NULL);
    if (ignored == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
        /* as in Python: a BaseException from explain replaces the error, chained to it */
        chain_to_handled(type, value, traceback);
        return NULL;
    }
    if (ignored == NULL) {
        PyErr_Clear(); /* telemetry must never replace the caller's error */
    }
    Py_XDECREF(ignored);
    PyErr_Restore(type, value, traceback);
    return NULL;
}

/* Bound like a function: on an instance, a method; on the class, itself. */
HOT PyObject *
layer_descr_get(PyObject *self, PyObject *instance, PyObject *owner)
{
    if (instance == NULL || instance == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, instance);
}

static PyObject *
layer_get_slow(LayerHead *self, void *closure)
{
    return Py_NewRef(self->slow);
}

static PyObject *
layer_get_original(LayerHead *self, void *closure)
{
    return Py_NewRef(self->original);
}

PyGetSetDef layer_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"slow", (getter)layer_get_slow, NULL, "the Python layer: every case but the remembered",
     NULL},
    {"original", (getter)layer_get_original, NULL, "what the layer calls to go on", NULL},
    {NULL},
};

/* unsuppressed's way for a context with a key that is not an exact str: dict lookups. */
COLD static int
unsuppressed_by_lookup(PyObject *context, PyObject *suppress_keys)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(suppress_keys); i++) {
        if (PyDict_Contains(context, PyTuple_GET_ITEM(suppress_keys, i)) != 0) {
            PyErr_Clear();
            return 0;
        }
    }
    return 1;
}

/* `key` (an exact str) is the suppression key `suppress` (an exact str). */
HOT static inline int
is_key(PyObject *key, PyObject *suppress)
{
    if (LIKELY(key != suppress)) {
        if (PyUnicode_GET_LENGTH(key) != PyUnicode_GET_LENGTH(suppress) ||
            (PyUnicode_CHECK_INTERNED(key) && PyUnicode_CHECK_INTERNED(suppress))) {
            return 0;
        }
        return PyUnicode_Compare(key, suppress) == 0;
    }
    return 1;
}

/* Nothing in the context suppresses instrumentation: 1; something may: 0.
 *
 * Why a scan and not a lookup per key: the current Context holds one or two entries (the
 * current span's key), and opentelemetry.context's keys are the very objects it made, so
 * comparing the few keys by identity (by value only for an equal-length str that is
 * another object) touches only the Context, which the caller just made, instead of two
 * lookups' worth of cold code and data. Any key that is not an exact str makes it look
 * the keys up, as dict membership would find them. */
HOT int
unsuppressed(PyObject *context_var, PyObject *suppress_keys)
{
    PyObject *context;
    if (UNLIKELY(PyContextVar_Get(context_var, NULL, &context) < 0)) {
        PyErr_Clear();
        return 0;
    }
    if (UNLIKELY(context == NULL || !PyDict_Check(context))) {
        Py_XDECREF(context);
        return 0;
    }
    int clear = 1;
    Py_ssize_t position = 0, count = PyTuple_GET_SIZE(suppress_keys);
    PyObject *key, *value;
    while (clear && PyDict_Next(context, &position, &key, &value)) {
        if (UNLIKELY(!PyUnicode_CheckExact(key))) {
            clear = unsuppressed_by_lookup(context, suppress_keys);
            break;
        }
        for (Py_ssize_t i = 0; i < count; i++) {
            if (UNLIKELY(is_key(key, PyTuple_GET_ITEM(suppress_keys, i)))) {
                clear = 0;
                break;
            }
        }
    }
    Py_DECREF(context);
    return clear;
}
