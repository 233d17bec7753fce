"""What the benchmark measures: the data scales, the endpoints, and the fresh-pair scheme that lets
every enrollment POST answer 201."""

from __future__ import annotations

from dataclasses import dataclass

#: Realistic proportions, the same at every scale: each student takes 10 courses and each course
#: has about 500 students, so a page of either list costs the same work at every scale and only
#: the size of the tables (and their indexes) changes.
COURSES_PER_STUDENT = 10
STUDENTS_PER_COURSE = 500
MIN_COURSES = 20

#: The page size the benchmark asks for: the service's default `limit`. The list statements fetch
#: one row more than that, to know whether a next page exists.
PAGE = 50

#: An upper bound on enrollments per second any tool reaches here; it sizes the block of fresh
#: (student, course) pairs each POST run gets. A run that outran it would reuse pairs, and the
#: service would answer 409: the benchmark counts those as errors, so an overrun cannot hide.
MAX_ENROLLMENTS_PER_SECOND = 25_000


@dataclass(frozen=True, slots=True)
class Scale:
    name: str
    enrollments: int

    @property
    def students(self) -> int:
        return self.enrollments // COURSES_PER_STUDENT

    @property
    def courses(self) -> int:
        return max(MIN_COURSES, self.enrollments // STUDENTS_PER_COURSE)


SCALES = {
    "10k": Scale("10k", 10_000),
    "1M": Scale("1M", 1_000_000),
    "10M": Scale("10M", 10_000_000),
}
SMOKE_SCALE = Scale("smoke", 2_000)


@dataclass(frozen=True, slots=True)
class Endpoint:
    key: str
    method: str
    path: str
    #: The named statement (a file of `sql/`) the endpoint runs; None for the HTTP-only one.
    query: str | None


HEALTH = Endpoint("health", "GET", "/health/live", None)
STUDENT_COURSES = Endpoint(
    "student_courses", "GET", "/students/{id}/courses", "enrollments/list_for_student"
)
ROSTER = Endpoint("roster", "GET", "/courses/{id}/students", "enrollments/roster")
ENROLL = Endpoint("enroll", "POST", "/students/{id}/courses", "enrollments/enroll")
ENDPOINTS = (HEALTH, STUDENT_COURSES, ROSTER, ENROLL)
DATA_ENDPOINTS = (STUDENT_COURSES, ROSTER, ENROLL)
#: The same enrollment through the v2 write paths, for `bench.profile`: with a fresh
#: Idempotency-Key on every request, and as PUT.
ENROLL_KEYED = Endpoint("enroll_keyed", "POST", "/students/{id}/courses", "enrollments/enroll")
ENROLL_PUT = Endpoint(
    "enroll_put", "PUT", "/students/{id}/courses/{course_id}", "enrollments/enroll"
)
#: A batch of BATCH_ITEMS fresh pairs per request; and a page of CHANGES_PAGE changes from the
#: start of a feed with history (bench.profile makes it).
BATCH = Endpoint("batch", "POST", "/enrollments/batch", "enrollments/batch")
BATCH_ITEMS = 100
CHANGES = Endpoint("changes", "GET", "/changes", "changes/page")
CHANGES_PAGE = 100
PROFILED = (*ENDPOINTS, ENROLL_KEYED, ENROLL_PUT, BATCH, CHANGES)


def is_enrollment(endpoint: Endpoint) -> bool:
    """An endpoint that writes fresh pairs, so each run needs newcomers of its own."""
    return endpoint.key.startswith("enroll") or endpoint is BATCH


@dataclass(frozen=True, slots=True)
class Ids:
    """The ids a run may use: seeded students 1..students and courses 1..courses, and for a POST
    run a block of `newcomers` students (ids from `newcomer_base`) that have no enrollment yet."""

    students: int
    courses: int
    newcomer_base: int = 0
    newcomers: int = 0


def fresh_pair(i: int, ids: Ids) -> tuple[int, int]:
    """The i-th fresh (student, course) pair of a run; distinct for i < newcomers * courses.

    Consecutive pairs name different students and different courses, so concurrent enrollments
    neither queue on one course's seat-count row nor share one student's foreign-key lock. The
    same arithmetic is written in Lua (wrk) and in pgbench's script language.
    """
    r = i % ids.newcomers
    q = i // ids.newcomers
    return ids.newcomer_base + r, 1 + (q + r) % ids.courses


def newcomers_needed(seconds: float, courses: int) -> int:
    pairs = int(seconds * MAX_ENROLLMENTS_PER_SECOND) + 1
    return -(-pairs // courses)
