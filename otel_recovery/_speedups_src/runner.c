/* Runner: RecoveryPolicy.runner()'s happy path, compiled. */
#include "speedups.h"

/* started_read's way for a clock that is not time.monotonic (a fake clock, say). */
COLD int
started_read_generic(RunnerObject *self, Started *started)
{
    started->value = PyObject_CallNoArgs(self->now);
    if (started->value == NULL) {
        return -1;
    }
    started->seconds = PyFloat_CheckExact(started->value) ? PyFloat_AS_DOUBLE(started->value) : -1.0;
    return 0;
}

/* A borrowed reference to the start time as an object; NULL with an error set. */
COLD PyObject *
started_object(Started *started)
{
    if (started->value == NULL) {
        started->value = PyFloat_FromDouble(started->seconds);
    }
    return started->value;
}

/* The "except Exception as error" branch of "guarded": recover(...) runs outside any
 * handler of the error, so the errors of later attempts keep their own __context__. */
COLD static PyObject *
runner_recover(RunnerObject *self, PyObject *fn, CallArgs *ca, Started *started)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    PyObject *result = NULL;
    PyObject *start = started_object(started);
    PyObject *ended = start == NULL ? NULL : PyObject_CallNoArgs(self->now);
    PyObject *took = ended == NULL ? NULL : PyNumber_Subtract(ended, start);
    Py_XDECREF(ended);
    if (took != NULL && callargs_materialize(ca) == 0) {
        PyObject *call_args[6] = {fn, ca->args, ca->kwargs, value, start, took};
        result = PyObject_Vectorcall(self->recover, call_args, 6, NULL);
    }
    Py_XDECREF(took);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return result;
}

/* "except BaseException: breaker.release(); raise". */
COLD void
runner_release(RunnerObject *self)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (call_method_discard(self->breaker, str_release) == 0) {
        PyErr_Restore(type, value, traceback);
        return;
    }
    /* release() failed: its error propagates, chained to the original, as in Python */
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    chain_to_handled(type, value, traceback);
}

/* reject(error, started, fn, args, kwargs, release=False): the policy's answer to a call
 * the breaker refuses (its fallback is per function, as last-known-good results are). */
COLD PyObject *
runner_reject(RunnerObject *self, PyObject *fn, CallArgs *ca, Started *started)
{
    PyObject *start = started_object(started);
    if (start == NULL || callargs_materialize(ca) < 0) {
        return NULL;
    }
    PyObject *error = PyObject_CallNoArgs(self->rejection);
    if (error == NULL) {
        return NULL;
    }
    PyObject *call_args[6] = {error, start, fn, ca->args, ca->kwargs, Py_False};
    PyObject *result = PyObject_Vectorcall(self->reject, call_args, 5, kw_release_false);
    Py_DECREF(error);
    return result;
}

/* runner_before_bucket_end's way when the end or the start is not a plain float. */
COLD int
before_bucket_end_generic(RunnerObject *self, Started *started)
{
    PyObject *end = slot_read(&self->bucket_end, self->budget);
    if (end == NULL) {
        return -1;
    }
    int before;
    if (PyFloat_CheckExact(end) && (started->value == NULL || PyFloat_CheckExact(started->value))) {
        before = started->seconds < PyFloat_AS_DOUBLE(end);
    }
    else {
        PyObject *start = started_object(started);
        before = start == NULL ? -1 : PyObject_RichCompareBool(start, end, Py_LT);
    }
    Py_DECREF(end);
    return before;
}

/* advance's way for an iterator that is not a Counter. */
COLD int
advance_iterator(PyObject *iterator)
{
    if (!PyIter_Check(iterator)) {
        PyErr_Format(PyExc_TypeError, "'%.200s' object is not an iterator",
                     Py_TYPE(iterator)->tp_name);
        return -1;
    }
    PyObject *value = PyIter_Next(iterator);
    if (value == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        return -1;
    }
    Py_DECREF(value);
    return 0;
}

/* runner_record_success's way when the tally is not a Counter in its slot. */
COLD int
record_success_generic(RunnerObject *self, PyObject *breaker)
{
    if (self->tallied) {
        PyObject *tally = slot_read(&self->tally, breaker);
        if (tally == NULL) {
            return -1;
        }
        if (tally != Py_None) {
            int counted = advance(tally);
            Py_DECREF(tally);
            return counted;
        }
        Py_DECREF(tally);
    }
    return call_method_discard(breaker, str_record_success);
}

/* breaker.can_execute() when the lock-free gate is shut; 1: go on, 0: rejected, -1: error. */
COLD int
runner_gate(PyObject *breaker)
{
    PyObject *answer = PyObject_CallMethodNoArgs(breaker, str_can_execute);
    if (answer == NULL) {
        return -1;
    }
    int permitted = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    return permitted;
}

/* budget.record_call(started) when the lock-free deposit does not apply (once a bucket,
 * every second, or always for a budget without a Counter). */
COLD NOINLINE int
runner_record_call(RunnerObject *self, Started *started)
{
    PyObject *start = started_object(started);
    PyObject *ignored =
        start == NULL ? NULL : PyObject_CallMethodOneArg(self->budget, str_record_call, start);
    if (ignored == NULL) {
        return -1;
    }
    Py_DECREF(ignored);
    return 0;
}

/* remember(fn, args, kwargs, result, started): last-known-good results are kept per
 * function and arguments; -1 on error. */
COLD int
runner_remember(RunnerObject *self, PyObject *fn, CallArgs *ca, PyObject *result,
                Started *started)
{
    PyObject *start = started_object(started);
    if (start == NULL || callargs_materialize(ca) < 0) {
        return -1;
    }
    PyObject *call_args[5] = {fn, ca->args, ca->kwargs, result, start};
    PyObject *ignored = PyObject_Vectorcall(self->remember, call_args, 5, NULL);
    if (ignored == NULL) {
        return -1;
    }
    Py_DECREF(ignored);
    return 0;
}

/* The call failed: recover from an Exception, release the permit on anything else. */
COLD static PyObject *
runner_failed(RunnerObject *self, PyObject *fn, CallArgs *ca, Started *started)
{
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        return runner_recover(self, fn, ca, started);
    }
    if (self->breaker != Py_None) {
        runner_release(self);
    }
    return NULL;
}

/* fn returned a coroutine: nothing ran, so nothing could be retried or counted. As in
 * _driver_sync._refuse_coroutine (same message): the coroutine is closed (no "never
 * awaited" warning), the breaker's permit given back, the call refused naming the fix. */
COLD static PyObject *
runner_refuse_coroutine(RunnerObject *self, PyObject *fn, PyObject *pending)
{
    PyObject *closed = PyObject_CallMethod(pending, "close", NULL);
    Py_DECREF(pending);
    if (closed != NULL) {
        Py_DECREF(closed);
        PyErr_Format(PyExc_TypeError,
                     "%R returned a coroutine, which runs nothing until it is awaited: "
                     "recovering a synchronous call cannot retry it or count its failures. "
                     "Declare the function `async def` (so @recover awaits it) or use "
                     "`await policy.acall(...)`",
                     fn);
    }
    if (self->breaker != Py_None) {
        runner_release(self);
    }
    return NULL;
}

HOT PyObject *
runner_run(RunnerObject *self, PyObject *fn, CallArgs *ca)
{
    int active = slot_true(&self->active, self->switches);
    if (UNLIKELY(active <= 0)) {
        return active < 0 ? NULL : callargs_call(fn, ca);
    }
    Started started;
    if (UNLIKELY(started_read(self, &started) < 0)) {
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *breaker = self->breaker == Py_None ? NULL : self->breaker;
    if (breaker != NULL) {
        int permitted = self->gate_unlocked ? slot_true(&self->permit_all, breaker) : 0;
        if (UNLIKELY(permitted != 1)) {
            permitted = permitted < 0 ? -1 : runner_gate(breaker);
            if (permitted <= 0) {
                result = permitted < 0 ? NULL : runner_reject(self, fn, ca, &started);
                goto done;
            }
        }
    }
    if (self->budget != Py_None) {
        int before = self->counter == Py_None ? 0 : runner_before_bucket_end(self, &started);
        if (LIKELY(before == 1)) {
            if (UNLIKELY(advance(self->counter) < 0)) {
                goto done;
            }
        }
        else if (before < 0 || runner_record_call(self, &started) < 0) {
            goto done;
        }
    }
    result = callargs_call(fn, ca);
    if (UNLIKELY(result == NULL)) {
        result = runner_failed(self, fn, ca, &started);
        goto done;
    }
    if (UNLIKELY(PyCoro_CheckExact(result))) {
        result = runner_refuse_coroutine(self, fn, result);
        goto done;
    }
    if (breaker != NULL && UNLIKELY(runner_record_success(self, breaker) < 0)) {
        Py_CLEAR(result);
        goto done;
    }
    if (UNLIKELY(self->remember != Py_None) &&
        runner_remember(self, fn, ca, result, &started) < 0) {
        Py_CLEAR(result);
    }
done:
    Py_XDECREF(started.value);
    return result;
}

static PyObject *
runner_vectorcall(RunnerObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "a runner is called as run(fn, args, kwargs)");
        return NULL;
    }
    if (!PyTuple_Check(argv[1]) || !PyDict_Check(argv[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "run(fn, args, kwargs) takes args as a tuple and kwargs as a dict");
        return NULL;
    }
    if (self->resolve != Py_None) {
        return async_run_from_tuple(self, argv[0], argv[1], argv[2]);
    }
    CallArgs ca = {NULL, 0, NULL, argv[1], argv[2], 0};
    return runner_run(self, argv[0], &ca);
}

static PyObject *
runner_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"switches", "now",    "breaker",   "gate_unlocked",
                            "tallied",  "budget", "counter",   "remember",
                            "recover",  "reject", "rejection", "resolve",
                            NULL};
    PyObject *switches, *now, *breaker, *budget, *counter, *remember, *recover, *reject,
        *rejection, *resolve = Py_None;
    int gate_unlocked, tallied;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOppOOOOOO|$O:Runner", names, &switches,
                                     &now, &breaker, &gate_unlocked, &tallied, &budget, &counter,
                                     &remember, &recover, &reject, &rejection, &resolve)) {
        return NULL;
    }
    if (resolve != Py_None && !PyCallable_Check(resolve)) {
        PyErr_SetString(PyExc_TypeError,
                        "Runner resolve must be None (a sync runner) or a coroutine function");
        return NULL;
    }
    if (counter != Py_None && !PyIter_Check(counter)) {
        PyErr_SetString(PyExc_TypeError, "Runner counter must be an iterator or None");
        return NULL;
    }
    RunnerObject *self = PyObject_GC_New(RunnerObject, type);
    if (self == NULL) {
        return NULL;
    }
    self->switches = Py_NewRef(switches);
    self->now = Py_NewRef(now);
    self->breaker = Py_NewRef(breaker);
    self->budget = Py_NewRef(budget);
    self->counter = Py_NewRef(counter);
    self->remember = Py_NewRef(remember);
    self->recover = Py_NewRef(recover);
    self->reject = Py_NewRef(reject);
    self->rejection = Py_NewRef(rejection);
    self->resolve = Py_NewRef(resolve);
    self->gate_unlocked = gate_unlocked;
    self->tallied = tallied;
    self->monotonic = HAVE_DIRECT_MONOTONIC && now == time_monotonic;
    slot_reader_init(&self->active, switches, str_active);
    slot_reader_init(&self->permit_all, breaker, str_permit_all);
    slot_reader_init(&self->tally, breaker, str_tally);
    slot_reader_init(&self->bucket_end, budget, str_bucket_end);
    self->vectorcall = (vectorcallfunc)runner_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
runner_traverse(RunnerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->switches);
    Py_VISIT(self->now);
    Py_VISIT(self->breaker);
    Py_VISIT(self->budget);
    Py_VISIT(self->counter);
    Py_VISIT(self->remember);
    Py_VISIT(self->recover);
    Py_VISIT(self->reject);
    Py_VISIT(self->rejection);
    Py_VISIT(self->resolve);
    return 0;
}

static int
runner_clear(RunnerObject *self)
{
    Py_CLEAR(self->switches);
    Py_CLEAR(self->now);
    Py_CLEAR(self->breaker);
    Py_CLEAR(self->budget);
    Py_CLEAR(self->counter);
    Py_CLEAR(self->remember);
    Py_CLEAR(self->recover);
    Py_CLEAR(self->reject);
    Py_CLEAR(self->rejection);
    Py_CLEAR(self->resolve);
    return 0;
}

static void
runner_dealloc(RunnerObject *self)
{
    PyObject_GC_UnTrack(self);
    runner_clear(self);
    PyObject_GC_Del(self);
}

PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_recovery._speedups.Runner",
    .tp_doc = PyDoc_STR("run(fn, args, kwargs): RecoveryPolicy.runner()'s happy path, compiled; "
                        "with resolve, arunner()'s, returning an awaitable AsyncRun."),
    .tp_basicsize = sizeof(RunnerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = runner_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RunnerObject, vectorcall),
    .tp_traverse = (traverseproc)runner_traverse,
    .tp_clear = (inquiry)runner_clear,
    .tp_dealloc = (destructor)runner_dealloc,
};
