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
        PyErr_SetString(PyExc_TypeError, "a layer's suppress_keys must be a tuple");
        return -1;
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

/* Nothing in the context suppresses instrumentation: 1; something may: 0. */
HOT int
unsuppressed(PyObject *context_var, PyObject *suppress_keys)
{
    PyObject *context;
    if (PyContextVar_Get(context_var, NULL, &context) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (context == NULL || !PyDict_Check(context)) {
        Py_XDECREF(context);
        return 0;
    }
    int clear = 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(suppress_keys); i++) {
        int found = PyDict_Contains(context, PyTuple_GET_ITEM(suppress_keys, i));
        if (found != 0) {
            PyErr_Clear();
            clear = 0;
            break;
        }
    }
    Py_DECREF(context);
    return clear;
}
