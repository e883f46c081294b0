//! Given / when / then tests of the enrolment example's course aggregate, on the embedded
//! backend: no server.

#[path = "../examples/enrolment/domain.rs"]
mod domain;

use domain::{
    Course, CourseCommand, CourseOpened, EnrolmentError, EnrolmentEvent, StudentEnrolled, StudentWithdrew,
};
use edupulse_events::Uuid;
use edupulse_events::testing::AggregateTest;

fn opened(course_id: Uuid, capacity: u32) -> EnrolmentEvent {
    CourseOpened { course_id, capacity }.into()
}

fn enrolled(course_id: Uuid, student_id: Uuid) -> EnrolmentEvent {
    StudentEnrolled { course_id, student_id }.into()
}

#[tokio::test]
async fn opening_a_course() {
    let c = Uuid::now_v7();
    let outcome = AggregateTest::<Course>::given([])
        .when(CourseCommand::Open { course_id: c, capacity: 30 })
        .await
        .then_expect([opened(c, 30)]);
    assert_eq!(outcome.published().len(), 1, "the event went through the bus");
    assert_eq!(outcome.published()[0].subject, "enrolment.CourseOpened");
    AggregateTest::<Course>::given([opened(c, 30)])
        .when(CourseCommand::Open { course_id: c, capacity: 30 })
        .await
        .then_error(EnrolmentError::AlreadyOpen);
    AggregateTest::<Course>::given([])
        .when(CourseCommand::Open { course_id: c, capacity: 0 })
        .await
        .then_error(EnrolmentError::NoSeats);
}

#[tokio::test]
async fn enrolling_until_full_then_withdrawing() {
    let (c, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    AggregateTest::<Course>::given([opened(c, 1)])
        .when(CourseCommand::Enroll { course_id: c, student_id: a })
        .await
        .then_expect([enrolled(c, a)]);
    AggregateTest::<Course>::given([opened(c, 1), enrolled(c, a)])
        .when(CourseCommand::Enroll { course_id: c, student_id: b })
        .await
        .then_error(EnrolmentError::Full { capacity: 1 });
    AggregateTest::<Course>::given([opened(c, 2), enrolled(c, a)])
        .when(CourseCommand::Enroll { course_id: c, student_id: a })
        .await
        .then_error(EnrolmentError::AlreadyEnrolled);
    AggregateTest::<Course>::given([])
        .when(CourseCommand::Enroll { course_id: c, student_id: a })
        .await
        .then_error(EnrolmentError::NotOpen);
    AggregateTest::<Course>::given([opened(c, 1), enrolled(c, a)])
        .when(CourseCommand::Withdraw { course_id: c, student_id: a })
        .await
        .then_expect([StudentWithdrew { course_id: c, student_id: a }.into()]);
}

#[tokio::test]
async fn a_mismatch_is_reported_event_by_event() {
    let (c, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let outcome = AggregateTest::<Course>::given([opened(c, 5)])
        .when(CourseCommand::Enroll { course_id: c, student_id: a })
        .await;
    let message = outcome.check_events(&[enrolled(c, b), enrolled(c, a)]).unwrap_err();
    let expected = format!(
        "given 1 event(s), when Enroll {{ course_id: {c}, student_id: {a} }}:\n\
         expected 2 event(s), got 1:\n  \
         #1 - StudentEnrolled(StudentEnrolled {{ course_id: {c}, student_id: {b} }})\n  \
         #1 + StudentEnrolled(StudentEnrolled {{ course_id: {c}, student_id: {a} }})\n  \
         #2 - StudentEnrolled(StudentEnrolled {{ course_id: {c}, student_id: {a} }})\n  \
         #2 + (nothing)\n"
    );
    assert_eq!(message, expected);

    let message = outcome.check_error(&EnrolmentError::NotOpen).unwrap_err();
    assert!(message.contains("expected the error NotOpen\nbut the command produced 1 event(s)"), "{message}");

    let refused =
        AggregateTest::<Course>::given([]).when(CourseCommand::Enroll { course_id: c, student_id: a }).await;
    let message = refused.check_events(&[enrolled(c, a)]).unwrap_err();
    assert!(message.ends_with("expected 1 event(s), but the command was refused: NotOpen"), "{message}");
    let message = refused.check_error(&EnrolmentError::AlreadyOpen).unwrap_err();
    assert!(message.ends_with("expected the error AlreadyOpen\nbut got the error NotOpen"), "{message}");
}

#[tokio::test]
#[should_panic(expected = "#1 - CourseOpened(CourseOpened")]
async fn then_expect_panics_with_the_difference() {
    let c = Uuid::now_v7();
    AggregateTest::<Course>::given([])
        .when(CourseCommand::Open { course_id: c, capacity: 3 })
        .await
        .then_expect([opened(c, 4)]);
}
