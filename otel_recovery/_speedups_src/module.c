/* otel_recovery._speedups: the per-call happy path, compiled.
 *
 * Why this exists: in CPython every bytecode of a per-call layer costs tens of machine
 * instructions. The Python layers and runner spend 7,000 to 12,000 instructions on the happy
 * path of a Redis GET, a psycopg statement or a requests GET; compiled, the same work takes
 * 1,600 to 2,300 (benchmarks/layer_cost.py).
 *
 * Sources: support.c (arguments, the exception being handled, __slots__ readers, the clock),
 * runner.c (Runner), async_run.c (AsyncRun, an async Runner's run), counter.c (Counter),
 * layer_head.c (what both layers share), attr_reader.c (the attributes of the instances a
 * Layer is called on), layer.c (PlanTable, Layer), http_layer.c (HttpLayer), speedups.h
 * (their shared declarations), and this file.
 *
 * It is an accelerator, never the source of truth:
 *
 * - Runner mirrors the closure RecoveryPolicy.runner() compiles in Python (_driver_sync.py,
 *   "guarded"), line for line; every case but the happy path calls back into the policy's
 *   Python methods (recover, reject, can_execute, record_call, record_success, release).
 *   An async Runner (RecoveryPolicy.arunner(), made with resolve) returns an AsyncRun, the
 *   same steps as a coroutine would take them (_driver_async.py, "guarded").
 * - Layer and HttpLayer handle only the remembered happy case of a per-call patch site:
 *   instrumentation on, nothing suppressed, a plan already remembered for this call's route.
 *   Anything else (the first call, a changed wrapper chain, a suppressed context, an
 *   internal surprise) calls the site's Python layer, which decides, plans and remembers; a
 *   request whose compiled first attempt fails goes on in Python (resume, settle).
 *
 * Without a C compiler the package installs without this module and behaves the same,
 * only slower (otel_recovery/_compiled.py). Tests run both.
 */
#include "speedups.h"

/* The interface otel_recovery/_compiled.py expects (its ABI): bump both together whenever a
 * type's constructor or behaviour changes, so that an extension built from other sources is
 * ignored instead of called with arguments it does not know. */
#define SPEEDUPS_ABI 5

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "otel_recovery._speedups",
    .m_doc = "The compiled happy path of otel_recovery's runners and per-call layers.",
    .m_size = -1,
};

static int
intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (intern(&str_active, "active") < 0 || intern(&str_permit_all, "_permit_all") < 0 ||
        intern(&str_tally, "_tally") < 0 || intern(&str_bucket_end, "_bucket_end") < 0 ||
        intern(&str_can_execute, "can_execute") < 0 ||
        intern(&str_record_call, "record_call") < 0 ||
        intern(&str_record_success, "record_success") < 0 ||
        intern(&str_release, "release") < 0 || intern(&str_enabled, "enabled") < 0 ||
        intern(&str_seen, "seen") < 0 || intern(&str_run, "run") < 0 ||
        intern(&str_statuses, "statuses") < 0 || intern(&str_method, "method") < 0 ||
        intern(&str_url, "url") < 0 || intern(&str_mro, "mro") < 0 ||
        intern(&str_dunder_class, "__class__") < 0) {
        return NULL;
    }
    PyObject *time_module = PyImport_ImportModule("time");
    if (time_module == NULL) {
        return NULL;
    }
    time_monotonic = PyObject_GetAttrString(time_module, "monotonic");
    Py_DECREF(time_module);
    if (time_monotonic == NULL) {
        return NULL;
    }
    kw_release_false = Py_BuildValue("(s)", "release");
    if (kw_release_false == NULL) {
        return NULL;
    }
    if (PyType_Ready(&RunnerType) < 0 || PyType_Ready(&PlanTableType) < 0 ||
        PyType_Ready(&LayerType) < 0 || PyType_Ready(&HttpLayerType) < 0 ||
        PyType_Ready(&CounterType) < 0 || PyType_Ready(&AsyncRunType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Runner", (PyObject *)&RunnerType) < 0 ||
        PyModule_AddObjectRef(module, "PlanTable", (PyObject *)&PlanTableType) < 0 ||
        PyModule_AddObjectRef(module, "Layer", (PyObject *)&LayerType) < 0 ||
        PyModule_AddObjectRef(module, "HttpLayer", (PyObject *)&HttpLayerType) < 0 ||
        PyModule_AddObjectRef(module, "Counter", (PyObject *)&CounterType) < 0 ||
        PyModule_AddObjectRef(module, "AsyncRun", (PyObject *)&AsyncRunType) < 0 ||
        PyModule_AddIntConstant(module, "ABI", SPEEDUPS_ABI) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
