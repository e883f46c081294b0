#![allow(unreachable_pub, dead_code)] // shared with tests/enrolment.rs and tests/aggregate.rs, which use parts of it
//! A small course-enrolment context: one aggregate, its events, commands and rules.

use std::collections::BTreeSet;

use edupulse_events::{Aggregate, DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

/// A course opened for enrolment with a number of seats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "enrolment")]
pub struct CourseOpened {
    /// The course.
    #[event(aggregate_id)]
    pub course_id: Uuid,
    /// Seats.
    pub capacity: u32,
}

/// A student took a seat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "enrolment")]
pub struct StudentEnrolled {
    /// The course.
    #[event(aggregate_id)]
    pub course_id: Uuid,
    /// The student, promoted: "which courses is this student in?"
    #[event(key)]
    pub student_id: Uuid,
}

/// A student gave a seat back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "enrolment")]
pub struct StudentWithdrew {
    /// The course.
    #[event(aggregate_id)]
    pub course_id: Uuid,
    /// The student.
    #[event(key)]
    pub student_id: Uuid,
}

/// Every event of the enrolment context.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "enrolment")]
pub enum EnrolmentEvent {
    /// See [`CourseOpened`].
    CourseOpened(CourseOpened),
    /// See [`StudentEnrolled`].
    StudentEnrolled(StudentEnrolled),
    /// See [`StudentWithdrew`].
    StudentWithdrew(StudentWithdrew),
}

/// What can be asked of a course.
#[derive(Debug, Clone)]
pub enum CourseCommand {
    /// Open it with `capacity` seats.
    Open {
        /// The course.
        course_id: Uuid,
        /// Seats.
        capacity: u32,
    },
    /// Give a student a seat.
    Enroll {
        /// The course.
        course_id: Uuid,
        /// The student.
        student_id: Uuid,
    },
    /// Take a student's seat back.
    Withdraw {
        /// The course.
        course_id: Uuid,
        /// The student.
        student_id: Uuid,
    },
}

/// Why a course refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrolmentError {
    /// Opening twice.
    #[error("the course is already open")]
    AlreadyOpen,
    /// A course needs at least one seat.
    #[error("a course needs at least one seat")]
    NoSeats,
    /// Enrolling in a course that is not open.
    #[error("the course is not open")]
    NotOpen,
    /// No seat left.
    #[error("the course is full ({capacity} seats)")]
    Full {
        /// Seats.
        capacity: u32,
    },
    /// The student has a seat already.
    #[error("the student is already enrolled")]
    AlreadyEnrolled,
    /// The student has no seat.
    #[error("the student is not enrolled")]
    NotEnrolled,
}

/// The course aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Course {
    /// Open for enrolment.
    pub open: bool,
    /// Seats.
    pub capacity: u32,
    /// Enrolled students.
    pub students: BTreeSet<Uuid>,
}

impl Aggregate for Course {
    const TYPE: &'static str = "course";
    const STATE_VERSION: u32 = 1;
    type Event = EnrolmentEvent;
    type Command = CourseCommand;
    type Error = EnrolmentError;

    fn apply(&mut self, event: &EnrolmentEvent) {
        match event {
            EnrolmentEvent::CourseOpened(e) => {
                self.open = true;
                self.capacity = e.capacity;
            }
            EnrolmentEvent::StudentEnrolled(e) => {
                self.students.insert(e.student_id);
            }
            EnrolmentEvent::StudentWithdrew(e) => {
                self.students.remove(&e.student_id);
            }
        }
    }

    fn decide(&self, command: &CourseCommand) -> Result<Vec<EnrolmentEvent>, EnrolmentError> {
        match *command {
            CourseCommand::Open { course_id, capacity } => {
                if self.open {
                    return Err(EnrolmentError::AlreadyOpen);
                }
                if capacity == 0 {
                    return Err(EnrolmentError::NoSeats);
                }
                Ok(vec![CourseOpened { course_id, capacity }.into()])
            }
            CourseCommand::Enroll { course_id, student_id } => {
                if !self.open {
                    return Err(EnrolmentError::NotOpen);
                }
                if self.students.contains(&student_id) {
                    return Err(EnrolmentError::AlreadyEnrolled);
                }
                if self.students.len() >= self.capacity as usize {
                    return Err(EnrolmentError::Full { capacity: self.capacity });
                }
                Ok(vec![StudentEnrolled { course_id, student_id }.into()])
            }
            CourseCommand::Withdraw { course_id, student_id } => {
                if !self.students.contains(&student_id) {
                    return Err(EnrolmentError::NotEnrolled);
                }
                Ok(vec![StudentWithdrew { course_id, student_id }.into()])
            }
        }
    }
}
