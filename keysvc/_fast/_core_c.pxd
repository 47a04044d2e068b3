# Declarations for compiling _core_py.py (through the _core_c.py link) in Cython's pure-Python
# mode: C types for the arithmetic and attributes, C calls between the hot functions.
import cython
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

cdef extern from "blake3_chunk.h":
    int keysvc_blake3_chunk(const char *data, size_t length, unsigned char *out) nogil

cdef object _CELL, _CREDITS, _DURATION
cdef bytes _BALANCE, _WINDOW
cdef Py_ssize_t _MAX_BUCKET_PART

cdef bytes _part(str text)
cpdef bytes hash_key(str key)
@cython.locals(size=Py_ssize_t, data=cython.p_const_char, out=cython.uchar[32])
cdef bytes _blake3_one_chunk(str key)
cpdef bytes bucket_key(bytes scope, str namespace, str identifier, long long duration)
cpdef bytes credits_key(str key_id)
cpdef bint is_window(bytes counter_key) except -1

@cython.locals(stored_seq=cython.longlong, cur=cython.longlong, prev=cython.longlong)
cpdef tuple window_counts(object raw, long long seq)

@cython.locals(rest=cython.longlong)
cpdef long long weighted_previous(long long prev, long long elapsed, long long duration) except? -1

@cython.locals(duration=cython.longlong)
cpdef bint cell_is_expired(bytes bucket, bytes raw, long long now_ms) except -1

@cython.locals(era=cython.longlong, yoe=cython.longlong, mp=cython.longlong, doy=cython.longlong,
               doe=cython.longlong)
cpdef long long days_from_civil(long long y, long long m, long long d) except? -1

@cython.locals(z=cython.longlong, era=cython.longlong, doe=cython.longlong, yoe=cython.longlong,
               doy=cython.longlong, mp=cython.longlong, d=cython.longlong, m=cython.longlong)
cpdef tuple civil_from_days(long long days)

cpdef int days_in_month(long long y, long long m) except -1

@cython.locals(today=cython.longlong, y=cython.longlong, m=cython.longlong, d=cython.longlong,
               target=cython.longlong)
cpdef long long last_refill_instant(long long now_ms, int kind, long long refill_day) except? -1

@cython.locals(instant=cython.longlong)
cpdef tuple apply_refill(long long remaining, long long last_refill_at, int kind, long long amount,
                         long long refill_day, long long now_ms)


cdef class RatelimitRule:
    cdef readonly object id
    cdef readonly str name
    cdef readonly long long limit
    cdef readonly long long duration
    cdef readonly bint auto_apply
    cdef readonly bytes bucket


cdef class RatelimitOutcome:
    cdef readonly object id
    cdef readonly str name
    cdef readonly long long limit
    cdef readonly long long duration
    cdef readonly bint auto_apply
    cdef readonly bint exceeded
    cdef readonly long long remaining
    cdef readonly long long reset


cdef class LimitOutcome:
    cdef readonly bint passed
    cdef readonly long long limit
    cdef readonly long long remaining
    cdef readonly long long reset


cdef class KeyView:
    cdef readonly object record
    cdef readonly str key_id
    cdef readonly str api_id
    cdef readonly str keyspace_id
    cdef readonly bint enabled
    cdef readonly long long expires
    cdef readonly frozenset permissions
    cdef readonly bint has_credits
    cdef readonly bytes credits_key
    cdef readonly int refill_kind
    cdef readonly long long refill_amount
    cdef readonly long long refill_day
    cdef readonly dict rules
    cdef readonly tuple auto_rules


cdef class Charge:
    cdef readonly KeyView view
    cdef readonly list checks
    cdef readonly long long cost


cdef class VerifyResult:
    cdef readonly str code
    cdef readonly bint valid
    cdef readonly KeyView key
    cdef readonly object credits
    cdef readonly list ratelimits
    cdef readonly long long spent


cdef class Verifier:
    cdef object _store
    cdef object _counters
    cdef object _counters_db
    cdef dict _cache
    cdef dict _cache_ids
    cdef Py_ssize_t _cache_size
    cdef dict _queries
    cdef Py_ssize_t _query_cache_size
    cdef object _seen
    cdef public long long hits
    cdef public long long misses

    cdef _sync_cache(self)
    @cython.locals(view=KeyView)
    cdef KeyView _load(self, str key, bytes digest)
    @cython.locals(view=KeyView)
    cdef _evict(self)
    @cython.locals(view=KeyView)
    cpdef KeyView lookup(self, str key)
    cpdef Py_ssize_t cache_len(self)
    cpdef object parse_query(self, str query)
    @cython.locals(result=VerifyResult)
    cpdef VerifyResult verify(self, str key, long long now_ms, object permissions=*, long long credits_cost=*,
                              object ratelimits=*, object api_ids=*, object keyspace_ids=*)
    @cython.locals(i=Py_ssize_t, results=list, pending=list)
    cpdef list verify_batch(self, list requests, long long now_ms)
    @cython.locals(view=KeyView, cost=cython.longlong)
    cdef object _prepare(self, str key, long long now_ms, object permissions, long long credits_cost,
                         object ratelimits, object api_ids, object keyspace_ids)
    @cython.locals(rule=RatelimitRule, chosen=dict)
    cdef list _ratelimit_checks(self, KeyView view, object requested)
    cdef VerifyResult _denied(self, str code, KeyView view, long long now_ms)
    @cython.locals(remaining=cython.longlong, last_refill_at=cython.longlong)
    cdef tuple _balance(self, object txn, KeyView view, long long now_ms)
    @cython.locals(view=KeyView, rule=RatelimitRule, rule_cost=cython.longlong, ok=cython.bint, passed=cython.bint,
                   balance=cython.longlong, last_refill_at=cython.longlong, cost=cython.longlong, outcomes=list,
                   cells=list)
    cdef VerifyResult _charge(self, object txn, Charge charge, long long now_ms)
    @cython.locals(seq=cython.longlong, start=cython.longlong, cur=cython.longlong, prev=cython.longlong,
                   elapsed=cython.longlong, effective=cython.longlong)
    cdef tuple _window(self, object txn, bytes bucket, long long limit, long long duration, long long cost,
                       long long now_ms)
    @cython.locals(limit=cython.longlong, duration=cython.longlong, cost=cython.longlong, ok=cython.bint,
                   passed=cython.bint, outcomes=list, cells=list)
    cpdef tuple limit(self, list items, long long now_ms)
