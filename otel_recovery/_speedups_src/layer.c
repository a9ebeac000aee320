/* PlanTable and Layer: the compiled redis-py command and psycopg statement sites. */
#include "speedups.h"

/* ------------------------------------------------------------------------------------ */
/* PlanTable: the plans a Layer may use for one holder (a Redis pool, a psycopg connection),
 * valid while its token is the layer's token and guard_map[guard_key] is guard_value. */

typedef struct {
    PyObject_HEAD
    PyObject *token;
    PyObject *plans; /* dict: route key -> Plan */
    PyObject *guard_map;
    PyObject *guard_key;
    PyObject *guard_value;
    int retired; /* replaced on its holder: a layer's cached reference must not serve */
} PlanTableObject;

static PyObject *
plantable_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"token", "plans", "guard_map", "guard_key", "guard_value", NULL};
    PyObject *token, *plans, *guard_map = Py_None, *guard_key = Py_None, *guard_value = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!|OOO:PlanTable", names, &token,
                                     &PyDict_Type, &plans, &guard_map, &guard_key,
                                     &guard_value)) {
        return NULL;
    }
    if (guard_map != Py_None && !PyDict_Check(guard_map)) {
        PyErr_SetString(PyExc_TypeError, "PlanTable guard_map must be a dict or None");
        return NULL;
    }
    PlanTableObject *self = PyObject_GC_New(PlanTableObject, type);
    if (self == NULL) {
        return NULL;
    }
    self->token = Py_NewRef(token);
    self->plans = Py_NewRef(plans);
    self->guard_map = Py_NewRef(guard_map);
    self->guard_key = Py_NewRef(guard_key);
    self->guard_value = Py_NewRef(guard_value);
    self->retired = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
plantable_retire(PlanTableObject *self, PyObject *unused)
{
    self->retired = 1;
    Py_RETURN_NONE;
}

static PyObject *
plantable_get_retired(PlanTableObject *self, void *closure)
{
    return PyBool_FromLong(self->retired);
}

static PyMethodDef plantable_methods[] = {
    {"retire", (PyCFunction)plantable_retire, METH_NOARGS,
     PyDoc_STR("retire(): the holder has a new table; layers that remembered this one "
               "read the holder's again.")},
    {NULL},
};

static PyGetSetDef plantable_getset[] = {
    {"retired", (getter)plantable_get_retired, NULL, "retire() was called", NULL},
    {NULL},
};

static int
plantable_traverse(PlanTableObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->token);
    Py_VISIT(self->plans);
    Py_VISIT(self->guard_map);
    Py_VISIT(self->guard_key);
    Py_VISIT(self->guard_value);
    return 0;
}

static int
plantable_clear(PlanTableObject *self)
{
    Py_CLEAR(self->token);
    Py_CLEAR(self->plans);
    Py_CLEAR(self->guard_map);
    Py_CLEAR(self->guard_key);
    Py_CLEAR(self->guard_value);
    return 0;
}

static void
plantable_dealloc(PlanTableObject *self)
{
    PyObject_GC_UnTrack(self);
    plantable_clear(self);
    PyObject_GC_Del(self);
}

static PyMemberDef plantable_members[] = {
    {"token", T_OBJECT, offsetof(PlanTableObject, token), READONLY, NULL},
    {"plans", T_OBJECT, offsetof(PlanTableObject, plans), READONLY, NULL},
    {"guard_map", T_OBJECT, offsetof(PlanTableObject, guard_map), READONLY, NULL},
    {"guard_key", T_OBJECT, offsetof(PlanTableObject, guard_key), READONLY, NULL},
    {"guard_value", T_OBJECT, offsetof(PlanTableObject, guard_value), READONLY, NULL},
    {NULL},
};

PyTypeObject PlanTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.PlanTable",
    .tp_doc = PyDoc_STR("PlanTable(token, plans, guard_map=None, guard_key=None, "
                        "guard_value=None): plans a Layer may use for one holder."),
    .tp_basicsize = sizeof(PlanTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = plantable_new,
    .tp_members = plantable_members,
    .tp_methods = plantable_methods,
    .tp_getset = plantable_getset,
    .tp_traverse = (traverseproc)plantable_traverse,
    .tp_clear = (inquiry)plantable_clear,
    .tp_dealloc = (destructor)plantable_dealloc,
};

/* ------------------------------------------------------------------------------------ */
/* Layer: a method-like patch site whose remembered happy path runs here. */

typedef struct {
    LAYER_HEAD
    /* What a remembered call reads, together: between two client calls each cache line of
     * the layer is fetched again (speedups.h, HOT). */
    vectorcallfunc vectorcall;
    PyObject *site;  /* Py_None, or an object whose .seen is (top, mode) */
    PyObject *owner; /* the class holding the patched attribute (with site) */
    PyObject *token; /* the table token when there is no site */
    Py_ssize_t key_index; /* >= 1: argument key_index; 0: the instance's type */
    Py_ssize_t run_index; /* the plan's runner: 2 (run) for a sync site, 3 (arun) when awaits */
    SlotReader seen;
    unsigned int owner_tag; /* owner's version tag when owner_top was read; 0: none */
    const void *owner_top;  /* owner.__dict__[attribute] then: compared, never used */
    PyObject *holder_ref;   /* weak reference to the holder `table` was read from */
    PyObject *table;        /* the PlanTable last read, or NULL (see layer_table) */
    AttrReader holder;      /* the instance's attribute that holds the PlanTable */
    AttrReader key;         /* name NULL, or the key is that attribute of the instance */
    /* read when the remembered path does not serve */
    PyObject *attribute;
    PyObject *table_attr;
    PyObject *explain;
} LayerObject;

/* `ref` (a weak reference) refers to `obj`, which is alive. */
HOT static inline int
refers_to(PyObject *ref, PyObject *obj)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *referent;
    if (PyWeakref_GetRef(ref, &referent) <= 0) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(referent);
    return referent == obj;
#else
    PyObject *referent = PyWeakref_GET_OBJECT(ref); /* Py_None once the referent died */
    return referent != Py_None && referent == obj;
#endif
}

/* The holder's PlanTable as its attribute holds it now, a new reference, remembered for the
 * next call; NULL (an error may be set) when it has none. The getattr may run Python (a
 * property, another thread), even this layer again: the fields are set only at the end,
 * releasing whatever they held then. */
COLD static PyObject *
layer_read_table(LayerObject *self, PyObject *holder)
{
    PyObject *table = PyObject_GetAttr(holder, self->table_attr);
    if (table != NULL && Py_TYPE(table) != &PlanTableType) {
        Py_CLEAR(table);
    }
    PyObject *ref = NULL;
    if (table != NULL && PyType_SUPPORTS_WEAKREFS(Py_TYPE(holder))) {
        ref = PyWeakref_NewRef(holder, NULL);
        if (ref == NULL) {
            PyErr_Clear(); /* read every time */
        }
    }
    if (ref != NULL) {
        Py_XSETREF(self->holder_ref, ref);
        Py_XSETREF(self->table, Py_NewRef(table));
    }
    else {
        Py_CLEAR(self->holder_ref);
        Py_CLEAR(self->table);
    }
    return table;
}

/* The holder's PlanTable, a new reference; NULL (an error may be set) when it has none.
 *
 * Why remembered: reading the table is a second attribute lookup on every call, and its
 * cache lines are cold between two client calls. The table a layer remembers is the one
 * its holder still has: only share_plans-style code replaces a holder's table, and it
 * retires the one it replaces (PlanTable.retire); a holder that died fails the weak
 * reference, so a new object at its address cannot inherit its table. A remembered table
 * whose token or guard no longer matches is read again once (layer_remembered_plan). */
HOT static PyObject *
layer_table(LayerObject *self, PyObject *holder, int *remembered)
{
    PlanTableObject *table = (PlanTableObject *)self->table;
    if (LIKELY(table != NULL && !table->retired && refers_to(self->holder_ref, holder))) {
        *remembered = 1;
        return Py_NewRef((PyObject *)table);
    }
    *remembered = 0;
    return layer_read_table(self, holder);
}

/* The table serves this layer: made under its token, and its guard still holds. */
HOT static inline int
table_valid(PlanTableObject *table, PyObject *token)
{
    if (UNLIKELY(table->token != token)) {
        return 0;
    }
    if (table->guard_map != Py_None) {
        PyObject *guard = PyDict_GetItemWithError(table->guard_map, table->guard_key);
        if (guard == NULL && !PyErr_Occurred()) {
            guard = Py_None; /* guard_map.get(guard_key), as the Python layer reads it */
        }
        if (UNLIKELY(guard != table->guard_value)) {
            return 0;
        }
    }
    return 1;
}

/* The plan for this call from its holder's table, a new reference; NULL (no error set) when
 * the Python layer has to decide. */
HOT static PyObject *
layer_remembered_plan(LayerObject *self, PyObject *const *argv, Py_ssize_t nargs)
{
    PyObject *token, *seen = NULL, *holder = NULL, *table = NULL, *plan = NULL;
    if (UNLIKELY(nargs < 1 || self->key_index >= nargs)) {
        return NULL;
    }
    if (self->site != Py_None) {
        /* the wrapper chain above us is the one the site last saw */
        seen = slot_read(&self->seen, self->site);
        if (UNLIKELY(seen == NULL || !PyTuple_Check(seen) || PyTuple_GET_SIZE(seen) != 2)) {
            goto miss;
        }
        PyTypeObject *owner = (PyTypeObject *)self->owner;
        unsigned int tag = valid_version_tag(owner);
        const void *top = self->owner_top;
        if (tag == 0 || tag != self->owner_tag) {
            top = PyDict_GetItemWithError(owner->tp_dict, self->attribute); /* borrowed */
            if (top == NULL) {
                goto miss;
            }
            self->owner_tag = tag;
            self->owner_top = top;
        }
        if (UNLIKELY(top != PyTuple_GET_ITEM(seen, 0))) {
            goto miss;
        }
        token = seen;
    }
    else {
        token = self->token;
    }
    holder = attr_read(&self->holder, argv[0]);
    if (UNLIKELY(holder == NULL)) {
        goto miss;
    }
    int remembered;
    table = layer_table(self, holder, &remembered);
    if (UNLIKELY(table == NULL)) {
        goto miss;
    }
    if (UNLIKELY(!table_valid((PlanTableObject *)table, token))) {
        if (!remembered || PyErr_Occurred()) {
            goto miss;
        }
        Py_SETREF(table, layer_read_table(self, holder)); /* the holder may have a new one */
        if (table == NULL || !table_valid((PlanTableObject *)table, token)) {
            goto miss;
        }
    }
    PyObject *key;
    if (self->key.name != NULL) {
        key = attr_read(&self->key, argv[0]);
        if (UNLIKELY(key == NULL)) {
            goto miss;
        }
    }
    else {
        key = Py_NewRef(self->key_index ? argv[self->key_index] : (PyObject *)Py_TYPE(argv[0]));
    }
    plan = PyDict_GetItemWithError(((PlanTableObject *)table)->plans, key);
    Py_XINCREF(plan); /* before the key goes: dropping it may run code that changes the dict */
    Py_DECREF(key);
    Py_ssize_t at = self->run_index;
    PyObject *runner = plan != NULL && PyTuple_Check(plan) && PyTuple_GET_SIZE(plan) > at
                           ? PyTuple_GET_ITEM(plan, at)
                           : NULL;
    if (UNLIKELY(runner == NULL || Py_TYPE(runner) != &RunnerType ||
                 (((RunnerObject *)runner)->resolve != Py_None) != (at == 3))) {
        Py_CLEAR(plan);
    }
miss:
    if (UNLIKELY(PyErr_Occurred())) {
        PyErr_Clear(); /* the Python layer meets the same surprise and reports it */
    }
    Py_XDECREF(seen);
    Py_XDECREF(holder);
    Py_XDECREF(table);
    return plan;
}

/* The remembered plan for this call, a new reference, when nothing suppresses
 * instrumentation; NULL (no error set) when the Python layer has to decide. */
HOT static inline PyObject *
layer_plan(LayerObject *self, PyObject *const *argv, Py_ssize_t nargs)
{
    return LIKELY(unsuppressed(self->context_var, self->suppress_keys))
               ? layer_remembered_plan(self, argv, nargs)
               : NULL;
}

/* An async site's call, when its run is first awaited: what the Python layer (an `async
 * def`) decides at that moment. The plan to run it under, a new reference; or NULL with
 * *instead set to what to await in its place (the original's coroutine when the layer is
 * switched off, the Python layer's for every other case), or NULL with an error set. */
HOT PyObject *
layer_decide(PyObject *layer, PyObject *const *argv, Py_ssize_t nargs, PyObject *kwnames,
             PyObject **instead)
{
    LayerObject *self = (LayerObject *)layer;
    int go_on;
    *instead = layer_head_gate((LayerHead *)self, argv, (size_t)nargs, kwnames, &go_on);
    if (UNLIKELY(!go_on)) {
        return NULL;
    }
    PyObject *plan = layer_plan(self, argv, nargs);
    if (UNLIKELY(plan == NULL)) {
        *instead = layer_call_slow((LayerHead *)self, argv, (size_t)nargs, kwnames);
    }
    return plan;
}

HOT static PyObject *
layer_vectorcall(LayerObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    int go_on;
    PyObject *routed = layer_head_gate((LayerHead *)self, argv, nargsf, kwnames, &go_on);
    if (UNLIKELY(!go_on)) {
        return routed;
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (self->run_index == 3) { /* an async site: decided when first awaited (layer_decide) */
        return async_run_from_layer((PyObject *)self, self->original, argv, nargs, kwnames,
                                    self->explain);
    }
    PyObject *plan = layer_plan(self, argv, nargs);
    if (UNLIKELY(plan == NULL)) {
        return layer_call_slow((LayerHead *)self, argv, nargsf, kwnames);
    }
    CallArgs ca = {argv, nargs, kwnames, NULL, NULL, 0};
    RunnerObject *runner = (RunnerObject *)PyTuple_GET_ITEM(plan, 2);
    PyObject *result = runner_run(runner, self->original, &ca);
    callargs_release(&ca);
    if (UNLIKELY(result == NULL) && PyErr_ExceptionMatches(PyExc_Exception)) {
        result = explain_error(self->explain, plan);
    }
    Py_DECREF(plan);
    return result;
}

static PyObject *
layer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"slow",   "original",    "patches",    "context_var",
                            "suppress_keys", "site", "owner", "attribute",
                            "token",  "holder_attr", "table_attr", "key_index",
                            "explain", "awaits", "key_attr", NULL};
    PyObject *slow, *original, *patches, *context_var, *suppress_keys, *site, *owner,
        *attribute, *token, *holder_attr, *table_attr, *explain;
    Py_ssize_t key_index;
    int awaits = 0;
    PyObject *key_attr = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO!OOOOUUnO|$pO:Layer", names, &slow,
                                     &original, &patches, &context_var, &PyTuple_Type,
                                     &suppress_keys, &site, &owner, &attribute, &token,
                                     &holder_attr, &table_attr, &key_index, &explain,
                                     &awaits, &key_attr)) {
        return NULL;
    }
    if (key_attr != Py_None && !PyUnicode_Check(key_attr)) {
        PyErr_SetString(PyExc_TypeError, "Layer key_attr must be None or a str");
        return NULL;
    }
    if (site != Py_None && (!PyType_Check(owner) || ((PyTypeObject *)owner)->tp_dict == NULL ||
                            !PyUnicode_Check(attribute))) {
        PyErr_SetString(PyExc_TypeError,
                        "Layer with a site needs owner (the class) and attribute (a str)");
        return NULL;
    }
    if (key_index < 0) {
        PyErr_SetString(PyExc_ValueError, "Layer key_index must be 0 (the type) or positive");
        return NULL;
    }
    LayerObject *self = PyObject_GC_New(LayerObject, type);
    if (self == NULL) {
        return NULL;
    }
    if (layer_head_init((LayerHead *)self, slow, original, patches, context_var,
                        suppress_keys) < 0) {
        PyObject_GC_Del(self);
        return NULL;
    }
    self->site = Py_NewRef(site);
    self->owner = Py_NewRef(owner);
    self->attribute = Py_NewRef(attribute);
    self->token = Py_NewRef(token);
    attr_reader_init(&self->holder, holder_attr);
    attr_reader_init(&self->key, key_attr == Py_None ? NULL : key_attr);
    self->table_attr = Py_NewRef(table_attr);
    self->key_index = key_index;
    self->explain = Py_NewRef(explain);
    self->run_index = awaits ? 3 : 2;
    slot_reader_init(&self->seen, site, str_seen);
    self->vectorcall = (vectorcallfunc)layer_vectorcall;
    self->owner_tag = 0;
    self->owner_top = NULL;
    self->holder_ref = NULL;
    self->table = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
layer_traverse(LayerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->site);
    Py_VISIT(self->owner);
    Py_VISIT(self->attribute);
    Py_VISIT(self->token);
    int visited = attr_reader_traverse(&self->holder, visit, arg);
    if (visited == 0) {
        visited = attr_reader_traverse(&self->key, visit, arg);
    }
    if (visited != 0) {
        return visited; /* what the visitor said: gc.get_referrers stops at a 1 */
    }
    Py_VISIT(self->table_attr);
    Py_VISIT(self->explain);
    Py_VISIT(self->holder_ref);
    Py_VISIT(self->table);
    return layer_head_traverse((LayerHead *)self, visit, arg);
}

static int
layer_clear(LayerObject *self)
{
    layer_head_clear((LayerHead *)self);
    Py_CLEAR(self->site);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->attribute);
    Py_CLEAR(self->token);
    attr_reader_clear(&self->holder);
    attr_reader_clear(&self->key);
    Py_CLEAR(self->table_attr);
    Py_CLEAR(self->explain);
    Py_CLEAR(self->holder_ref);
    Py_CLEAR(self->table);
    return 0;
}

static void
layer_dealloc(LayerObject *self)
{
    PyObject_GC_UnTrack(self);
    layer_clear(self);
    PyObject_GC_Del(self);
}

PyTypeObject LayerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.Layer",
    .tp_doc = PyDoc_STR("A per-call patch site whose remembered happy path is compiled."),
    .tp_basicsize = sizeof(LayerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = layer_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(LayerObject, vectorcall),
    .tp_dictoffset = offsetof(LayerObject, dict),
    .tp_descr_get = layer_descr_get,
    .tp_getset = layer_getset,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_traverse = (traverseproc)layer_traverse,
    .tp_clear = (inquiry)layer_clear,
    .tp_dealloc = (destructor)layer_dealloc,
};
