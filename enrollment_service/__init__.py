"""enrollment-service: students, courses, and the enrollments between them."""
