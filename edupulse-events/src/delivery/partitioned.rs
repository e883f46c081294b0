//! A relay's publish, one publish per partition at once: the broker's answers then name a
//! sequence for each partition, which is what the relay's marks keep.
//!
//! A fast-ingest batch (`broker/fast.rs`) is acknowledged once, naming the stream sequence
//! of the last message it stored only: other messages of the batch get a receipt without
//! their sequence. The marks (`watch/marks.rs`) keep, per partition and stream, the
//! highest sequence acknowledged and the event stored there, to find a stream that lost
//! what it acknowledged. So that each partition's batch names that partition's own last
//! stored message, each partition's messages are one publish, and the partitions' publishes
//! run together. Partitions share no aggregate, so no aggregate's order depends on another
//! publish; a broker without batches sees the same messages, in more calls.

use std::collections::HashMap;

use crate::EventError;
use crate::broker::{PublishReceipt, Publisher};
use crate::event::wire::OutgoingMessage;
use crate::store::Partition;

/// Publishes `messages`, the messages of `partitions[i]` as one publish per partition, all
/// at once; one outcome per message, in the order given.
pub(crate) async fn publish_by_partition(
    publisher: &dyn Publisher,
    partitions: &[Partition],
    messages: &[OutgoingMessage],
) -> Vec<Result<PublishReceipt, EventError>> {
    let mut groups: Vec<(Partition, Vec<usize>)> = Vec::new();
    let mut group_of: HashMap<Partition, usize> = HashMap::new();
    for (i, partition) in partitions.iter().enumerate().take(messages.len()) {
        let g = *group_of.entry(*partition).or_insert_with(|| {
            groups.push((*partition, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    if groups.len() <= 1 {
        return publisher.publish(messages).await;
    }
    let owned: Vec<Vec<OutgoingMessage>> =
        groups.iter().map(|(_, indices)| indices.iter().map(|&i| messages[i].clone()).collect()).collect();
    let answers = futures_util::future::join_all(owned.iter().map(|group| publisher.publish(group))).await;
    let mut outcomes: Vec<Option<Result<PublishReceipt, EventError>>> =
        messages.iter().map(|_| None).collect();
    for ((_, indices), answer) in groups.iter().zip(answers) {
        for (&i, outcome) in indices.iter().zip(answer) {
            outcomes[i] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Err(EventError::broker_message(
                    crate::BrokerErrorKind::Other,
                    "the publisher returned no outcome",
                ))
            })
        })
        .collect()
}
