/* HttpLayer: the compiled requests Session.request site. */
#include "speedups.h"

/* ------------------------------------------------------------------------------------ */
/* HttpLayer: Session.request-like sites, (self, method, url, **options) or (self, **options)
 * with method= and url=. The remembered happy path is the first attempt of a request whose
 * plan is remembered under its URL and method, that
 * the breaker and budget admit lock-free and that gets a response with a status not to
 * retry on. A first attempt that fails hands its outcome to the site's Python `resume`,
 * which goes on exactly as the Python layer would after that attempt; a request that does
 * not qualify before anything happened runs the Python layer (`slow`) whole. */

/* The statuses to retry on as a bitmap, for the configured sets (exact ints, 100..611): a
 * bit test instead of a set lookup, whose hashing code and table are cold between two
 * requests. One cache line. */
#define STATUS_BASE 100
#define STATUS_WORDS 8

typedef struct {
    LAYER_HEAD
    PyObject *by_url;           /* dict: url -> (method, plan, method, plan, ...) */
    PyObject *plan_type;        /* the plans' class: run and statuses are read from slots */
    PyObject *body_names;       /* tuple of str: options that send a body unless None */
    PyObject *status_attribute; /* str */
    PyObject *signal;           /* signal(response) -> the error to retry on, or None */
    PyObject *unreadable;       /* unreadable(error): a status that cannot be judged */
    PyObject *resume;           /* resume(plan, outcomes, error, started, took, args, kwargs) */
    PyObject *settle;           /* settle(outcomes, raised, value, args, kwargs) */
    SlotReader run, statuses;
    vectorcallfunc vectorcall;
    PyObject *status_set; /* the frozenset status_bits describe, or NULL */
    int status_bits_whole; /* every member of status_set is in status_bits */
    uint64_t status_bits[STATUS_WORDS];
} HttpLayerObject;

/* Two keyword names are the same str. Names in code are interned, so two interned names
 * that are different objects differ, without comparing characters. */
HOT static int
same_name(PyObject *given, PyObject *name)
{
    if (given == name) {
        return 1;
    }
    if (PyUnicode_CHECK_INTERNED(given) && PyUnicode_CHECK_INTERNED(name)) {
        return 0;
    }
    return PyUnicode_Compare(given, name) == 0;
}

/* An option that sends a body is set, or an option is an iterator (params=zip(...)) that
 * the first attempt consumes (_http.one_shot): the plan depends on it, so Python decides. */
HOT static int
http_sends_body(HttpLayerObject *self, PyObject *const *values, PyObject *kwnames)
{
    Py_ssize_t count = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (values[i] == Py_None) {
            continue;
        }
        if (PyIter_Check(values[i])) {
            return 1;
        }
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(self->body_names); j++) {
            PyObject *body = PyTuple_GET_ITEM(self->body_names, j);
            if (same_name(name, body)) {
                return 1;
            }
        }
    }
    return 0;
}

/* The value of keyword option `name`, borrowed; None when it is not given. */
HOT static PyObject *
keyword(PyObject *const *values, PyObject *kwnames, PyObject *name)
{
    Py_ssize_t count = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *given = PyTuple_GET_ITEM(kwnames, i);
        if (same_name(given, name)) {
            return values[i];
        }
    }
    return Py_None;
}

/* A method the plan was remembered for (`stored`, an exact str or bytes) is the request's
 * (`given`): 1 or 0. Methods are nearly always the same interned str. Only an exact str or
 * bytes is compared by value, as HttpPlans.recall does: a subclass's __eq__ could say yes to
 * a method whose plan must differ (a POST answered by a GET's plan would be sent twice). */
HOT static int
same_method(PyObject *stored, PyObject *given)
{
    if (LIKELY(stored == given)) {
        return 1;
    }
    if (PyUnicode_CheckExact(given)) {
        return PyUnicode_CheckExact(stored) && same_name(given, stored);
    }
    if (PyBytes_CheckExact(given) && PyBytes_CheckExact(stored)) {
        return PyBytes_GET_SIZE(given) == PyBytes_GET_SIZE(stored) &&
               memcmp(PyBytes_AS_STRING(given), PyBytes_AS_STRING(stored),
                      (size_t)PyBytes_GET_SIZE(given)) == 0;
    }
    return 0;
}

/* The plan remembered for the request's URL and method, a new reference; NULL (no error
 * set) if none. session.get(url) passes them positionally, requests.get(url) by name.
 * Why the URL first and not a (method, url) key: the URL's hash is cached in the str, and
 * the methods under it are a short tuple compared by identity, where a key tuple costs an
 * allocation, its hash and an element-wise comparison on every request. */
HOT static PyObject *
http_remembered_plan(HttpLayerObject *self, PyObject *const *argv, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    PyObject *method = nargs == 3 ? argv[1] : keyword(argv + 1, kwnames, str_method);
    PyObject *url = nargs == 3 ? argv[2] : keyword(argv + 1, kwnames, str_url);
    PyObject *entry = PyDict_GetItemWithError(self->by_url, url); /* borrowed */
    if (entry == NULL || !PyTuple_CheckExact(entry)) {
        PyErr_Clear(); /* an unhashable URL: Python reports it the same way */
        return NULL;
    }
    PyObject *plan = NULL; /* no Python code runs from here: entry stays as it is */
    for (Py_ssize_t i = 0; i + 1 < PyTuple_GET_SIZE(entry); i += 2) {
        if (same_method(PyTuple_GET_ITEM(entry, i), method)) {
            plan = PyTuple_GET_ITEM(entry, i + 1);
            break;
        }
    }
    if (plan == NULL || (PyObject *)Py_TYPE(plan) != self->plan_type) {
        return NULL;
    }
    return Py_NewRef(plan);
}

/* Make status_bits describe `statuses`; what status_bits_for answers. Only a frozenset is
 * remembered (a set can change under us). A frozenset with a member that is not an exact
 * int in 100..611 is not whole: every status is looked up in the set itself. */
COLD static int
status_bits_make(HttpLayerObject *self, PyObject *statuses)
{
    if (!PyFrozenSet_CheckExact(statuses)) {
        return 0;
    }
    PyObject *iterator = PyObject_GetIter(statuses);
    if (iterator == NULL) {
        PyErr_Clear();
        return 0;
    }
    uint64_t bits[STATUS_WORDS] = {0};
    int whole = 1;
    PyObject *item;
    while ((item = PyIter_Next(iterator)) != NULL) {
        int overflow = 0;
        long status = PyLong_CheckExact(item) ? PyLong_AsLongAndOverflow(item, &overflow) : -1;
        if (overflow || status < STATUS_BASE || status >= STATUS_BASE + 64 * STATUS_WORDS) {
            whole = 0;
        }
        else {
            long bit = status - STATUS_BASE;
            bits[bit / 64] |= (uint64_t)1 << (bit % 64);
        }
        Py_DECREF(item);
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    /* the bits first: releasing the old set last, nothing it runs sees them half made */
    memcpy(self->status_bits, bits, sizeof(bits));
    self->status_bits_whole = whole;
    Py_XSETREF(self->status_set, Py_NewRef(statuses));
    return whole;
}

/* 1: status_bits answer for every exact int status of `statuses`; 0: look statuses up. */
HOT static inline int
status_bits_for(HttpLayerObject *self, PyObject *statuses)
{
    if (LIKELY(statuses == self->status_set)) {
        return self->status_bits_whole;
    }
    return status_bits_make(self, statuses);
}

/* `status` (an exact int) is in the set status_bits describe whole. */
HOT static inline int
status_bit(HttpLayerObject *self, PyObject *status)
{
    int overflow = 0;
    long value = PyLong_AsLongAndOverflow(status, &overflow);
    if (overflow || value < STATUS_BASE || value >= STATUS_BASE + 64 * STATUS_WORDS) {
        return 0; /* an int too large for a long is not in the set either */
    }
    long bit = value - STATUS_BASE;
    return (int)((self->status_bits[bit / 64] >> (bit % 64)) & 1);
}

/* The response's status is one to retry on; a status that cannot be judged is reported
 * and is not (as HttpSite.attempt does). -1 on error. */
HOT static int
http_failed(HttpLayerObject *self, PyObject *response, PyObject *statuses)
{
    PyObject *status = PyObject_GetAttr(response, self->status_attribute);
    if (status == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            goto unreadable;
        }
        PyErr_Clear();
        status = Py_NewRef(Py_None);
    }
    int failed = PyLong_CheckExact(status) && status_bits_for(self, statuses)
                     ? status_bit(self, status)
                     : PySet_Contains(statuses, status);
    Py_DECREF(status);
    if (failed >= 0) {
        return failed;
    }
unreadable:
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return -1;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *reported = PyObject_CallOneArg(self->unreadable, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (reported == NULL) {
        return -1;
    }
    Py_DECREF(reported);
    return 0;
}

/* [outcome]: the list an attempt's outcomes go in, a new reference; NULL on error. */
static PyObject *
http_outcomes(PyObject *outcome)
{
    PyObject *outcomes = PyList_New(outcome == NULL ? 0 : 1);
    if (outcomes != NULL && outcome != NULL) {
        PyList_SET_ITEM(outcomes, 0, Py_NewRef(outcome));
    }
    return outcomes;
}

/* What the Python layer does once the runner returned `value` (raised == 0) or raised it:
 * settle(outcomes, raised, value, args, kwargs), with the caller's exception state as it
 * is (the layer's `deliver` runs outside any handler). Steals `outcomes` and `value`. */
COLD static PyObject *
http_settle(HttpLayerObject *self, PyObject *outcomes, int raised, PyObject *value, CallArgs *ca)
{
    PyObject *result = NULL;
    if (outcomes != NULL && value != NULL && callargs_materialize(ca) == 0) {
        PyObject *call_args[5] = {outcomes, raised ? Py_True : Py_False, value, ca->args,
                                  ca->kwargs};
        result = PyObject_Vectorcall(self->settle, call_args, 5, NULL);
    }
    Py_XDECREF(outcomes);
    Py_XDECREF(value);
    return result;
}

/* "The runner raised" at the point where the pending error arose: settle(raised=True). */
COLD static PyObject *
http_settle_pending(HttpLayerObject *self, PyObject *outcome, CallArgs *ca)
{
    PyObject *error = fetch_error();
    return http_settle(self, http_outcomes(outcome), 1, error, ca);
}

/* The first attempt failed (`error`; `response` is the failed response, or NULL when the
 * original raised): as the runner's `except Exception` branch, resume(...) runs
 * plan.recover, outside any handler of `error`; then settle(...) runs the rest of the
 * layer. Steals `error`. */
COLD static PyObject *
http_resume(HttpLayerObject *self, RunnerObject *runner, PyObject *plan, PyObject *error,
            PyObject *response, Started *started, CallArgs *ca)
{
    PyObject *outcomes = http_outcomes(response != NULL ? response : error);
    if (outcomes == NULL) {
        Py_DECREF(error);
        return NULL;
    }
    PyObject *result = NULL, *took = NULL;
    PyObject *start = started_object(started);
    PyObject *ended = start == NULL ? NULL : PyObject_CallNoArgs(runner->now);
    if (ended != NULL) {
        took = PyNumber_Subtract(ended, start);
        Py_DECREF(ended);
    }
    if (took != NULL && callargs_materialize(ca) == 0) {
        PyObject *call_args[7] = {plan, outcomes, error, start, took, ca->args, ca->kwargs};
        result = PyObject_Vectorcall(self->resume, call_args, 7, NULL);
    }
    Py_XDECREF(took);
    Py_DECREF(error);
    if (result == NULL) {
        return http_settle(self, outcomes, 1, fetch_error(), ca);
    }
    return http_settle(self, outcomes, 0, result, ca);
}

/* The remembered first attempt. *taken is 0 when nothing happened and the Python layer
 * must run the request instead. Once something happened, every outcome goes the way the
 * Python layer's would: errors of our own steps included. */
HOT static PyObject *
http_first_attempt(HttpLayerObject *self, PyObject *plan, CallArgs *ca, int *taken)
{
    *taken = 0;
    PyObject *result = NULL;
    PyObject *run = slot_read(&self->run, plan);
    PyObject *statuses = run == NULL ? NULL : slot_read(&self->statuses, plan);
    if (statuses == NULL || Py_TYPE(run) != &RunnerType || !PyAnySet_Check(statuses)) {
        goto not_taken;
    }
    RunnerObject *runner = (RunnerObject *)run;
    PyObject *breaker = runner->breaker == Py_None ? NULL : runner->breaker;
    /* admitted without a side effect, or Python decides */
    if (runner->remember != Py_None || slot_true(&runner->active, runner->switches) != 1) {
        goto not_taken;
    }
    if (breaker != NULL &&
        !(runner->gate_unlocked && slot_true(&runner->permit_all, breaker) == 1)) {
        goto not_taken;
    }
    Started started;
    if (started_read(runner, &started) < 0) {
        goto not_taken;
    }
    if (runner->budget != Py_None &&
        (runner->counter == Py_None || runner_before_bucket_end(runner, &started) != 1)) {
        Py_XDECREF(started.value);
        goto not_taken;
    }
    *taken = 1;
    if (runner->budget != Py_None && advance(runner->counter) < 0) {
        result = http_settle_pending(self, NULL, ca); /* nothing sent: Python's deliver sends */
        goto done;
    }
    PyObject *response = callargs_call(self->original, ca);
    if (response == NULL) {
        PyObject *error = fetch_error(); /* attempt: outcomes.append(error); raise */
        if (PyObject_TypeCheck(error, (PyTypeObject *)PyExc_Exception)) {
            result = http_resume(self, runner, plan, error, NULL, &started, ca);
            goto done;
        }
        /* the runner: "except BaseException: breaker.release(); raise"; then the layer */
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), Py_NewRef(error),
                      PyException_GetTraceback(error));
        if (breaker != NULL) {
            runner_release(runner);
        }
        result = http_settle_pending(self, error, ca);
        Py_DECREF(error);
        goto done;
    }
    /* attempt: outcomes.append(response), then the status check */
    PyObject *signal = NULL;
    int failed = http_failed(self, response, statuses);
    if (failed > 0) {
        signal = PyObject_CallOneArg(self->signal, response);
        if (signal == NULL) {
            failed = -1;
        }
        else if (signal == Py_None) {
            Py_CLEAR(signal);
            failed = 0;
        }
    }
    if (signal != NULL) { /* raise signal */
        result = http_resume(self, runner, plan, signal, response, &started, ca);
    }
    else if (failed < 0) { /* raised in attempt after the response was appended */
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            result = http_resume(self, runner, plan, fetch_error(), response, &started, ca);
        }
        else {
            if (breaker != NULL) {
                runner_release(runner);
            }
            result = http_settle_pending(self, response, ca);
        }
    }
    else if (breaker != NULL && runner_record_success(runner, breaker) < 0) {
        result = http_settle_pending(self, response, ca); /* raised by the runner */
    }
    else {
        result = Py_NewRef(response);
    }
    Py_DECREF(response);
done:
    Py_XDECREF(started.value);
not_taken:
    if (!*taken) {
        PyErr_Clear();
    }
    Py_XDECREF(run);
    Py_XDECREF(statuses);
    return result;
}

HOT static PyObject *
http_vectorcall(HttpLayerObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    int go_on;
    PyObject *routed = layer_head_gate((LayerHead *)self, argv, nargsf, kwnames, &go_on);
    if (!go_on) {
        return routed;
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if ((nargs != 3 && nargs != 1) ||
        !unsuppressed(self->context_var, self->suppress_keys) ||
        http_sends_body(self, argv + nargs, kwnames)) {
        return layer_call_slow((LayerHead *)self, argv, nargsf, kwnames);
    }
    PyObject *plan = http_remembered_plan(self, argv, nargs, kwnames);
    if (plan == NULL) {
        return layer_call_slow((LayerHead *)self, argv, nargsf, kwnames);
    }
    CallArgs ca = {argv, nargs, kwnames, NULL, NULL, 0};
    int taken;
    PyObject *result = http_first_attempt(self, plan, &ca, &taken);
    callargs_release(&ca);
    Py_DECREF(plan);
    if (!taken) {
        return layer_call_slow((LayerHead *)self, argv, nargsf, kwnames);
    }
    return result;
}

static PyObject *
http_layer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"slow",       "original",   "patches",          "context_var",
                            "suppress_keys", "by_url",  "plan_type",        "body_names",
                            "status_attribute", "signal", "unreadable",     "resume",
                            "settle", NULL};
    PyObject *slow, *original, *patches, *context_var, *suppress_keys, *by_url, *plan_type,
        *body_names, *status_attribute, *signal, *unreadable, *resume, *settle;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO!O!O!O!UOOOO:HttpLayer", names, &slow,
                                     &original, &patches, &context_var, &PyTuple_Type,
                                     &suppress_keys, &PyDict_Type, &by_url, &PyType_Type,
                                     &plan_type, &PyTuple_Type, &body_names, &status_attribute,
                                     &signal, &unreadable, &resume, &settle)) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(body_names); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(body_names, i))) {
            PyErr_SetString(PyExc_TypeError, "HttpLayer body_names must be a tuple of str");
            return NULL;
        }
    }
    HttpLayerObject *self = PyObject_GC_New(HttpLayerObject, type);
    if (self == NULL) {
        return NULL;
    }
    if (layer_head_init((LayerHead *)self, slow, original, patches, context_var,
                        suppress_keys) < 0) {
        PyObject_GC_Del(self);
        return NULL;
    }
    self->by_url = Py_NewRef(by_url);
    self->plan_type = Py_NewRef(plan_type);
    self->body_names = Py_NewRef(body_names);
    self->status_attribute = Py_NewRef(status_attribute);
    self->signal = Py_NewRef(signal);
    self->unreadable = Py_NewRef(unreadable);
    self->resume = Py_NewRef(resume);
    self->settle = Py_NewRef(settle);
    slot_reader_for_type(&self->run, (PyTypeObject *)plan_type, str_run);
    slot_reader_for_type(&self->statuses, (PyTypeObject *)plan_type, str_statuses);
    self->vectorcall = (vectorcallfunc)http_vectorcall;
    self->status_set = NULL;
    self->status_bits_whole = 0;
    memset(self->status_bits, 0, sizeof(self->status_bits));
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
http_layer_traverse(HttpLayerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->by_url);
    Py_VISIT(self->status_set);
    Py_VISIT(self->plan_type);
    Py_VISIT(self->body_names);
    Py_VISIT(self->status_attribute);
    Py_VISIT(self->signal);
    Py_VISIT(self->unreadable);
    Py_VISIT(self->resume);
    Py_VISIT(self->settle);
    return layer_head_traverse((LayerHead *)self, visit, arg);
}

static int
http_layer_clear(HttpLayerObject *self)
{
    layer_head_clear((LayerHead *)self);
    Py_CLEAR(self->by_url);
    Py_CLEAR(self->status_set);
    Py_CLEAR(self->plan_type);
    Py_CLEAR(self->body_names);
    Py_CLEAR(self->status_attribute);
    Py_CLEAR(self->signal);
    Py_CLEAR(self->unreadable);
    Py_CLEAR(self->resume);
    Py_CLEAR(self->settle);
    return 0;
}

static void
http_layer_dealloc(HttpLayerObject *self)
{
    PyObject_GC_UnTrack(self);
    http_layer_clear(self);
    PyObject_GC_Del(self);
}

PyTypeObject HttpLayerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.HttpLayer",
    .tp_doc = PyDoc_STR("A request-sending patch site whose remembered first attempt is compiled."),
    .tp_basicsize = sizeof(HttpLayerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = http_layer_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HttpLayerObject, vectorcall),
    .tp_dictoffset = offsetof(HttpLayerObject, dict),
    .tp_descr_get = layer_descr_get,
    .tp_getset = layer_getset,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_traverse = (traverseproc)http_layer_traverse,
    .tp_clear = (inquiry)http_layer_clear,
    .tp_dealloc = (destructor)http_layer_dealloc,
};
