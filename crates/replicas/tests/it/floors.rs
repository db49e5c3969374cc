//! Session floors in a real Redis: raised, never lowered, kept for their time, and unreadable
//! ones reported rather than read as "no floor".

use std::time::Duration;

use keel_replicas::{Floors, Lsn};

async fn floors() -> (Floors, fred::prelude::Client, String) {
    let (url, prefix) = keel_testkit::fresh_prefix().await;
    let floors = Floors::redis(&url, &prefix).await.expect("floors in Redis");
    let client = keel_redis::client(&url, Duration::from_secs(1), keel_redis::Protocol::Resp2)
        .await
        .expect("a Redis client");
    (floors, client, prefix)
}

#[tokio::test]
async fn a_floor_is_raised_by_a_later_write_and_never_lowered_by_an_earlier_one() {
    let (floors, _, _) = floors().await;
    let minute = Duration::from_secs(60);
    assert_eq!(floors.get("ada").await.unwrap(), None);
    floors
        .raise("ada", Lsn(0x2_0000_0000), minute)
        .await
        .unwrap();
    floors
        .raise("ada", Lsn(0x1_ffff_ffff), minute)
        .await
        .unwrap();
    assert_eq!(floors.get("ada").await.unwrap(), Some(Lsn(0x2_0000_0000)));
    floors
        .raise("ada", Lsn(0x2_0000_0001), minute)
        .await
        .unwrap();
    assert_eq!(floors.get("ada").await.unwrap(), Some(Lsn(0x2_0000_0001)));
    assert_eq!(
        floors.get("bob").await.unwrap(),
        None,
        "one floor per session"
    );
}

#[tokio::test]
async fn a_floor_past_its_time_is_gone() {
    let (floors, _, _) = floors().await;
    floors
        .raise("ada", Lsn(7), Duration::from_millis(50))
        .await
        .unwrap();
    keel_testkit::eventually(Duration::from_secs(10), "the floor to expire", || async {
        floors.get("ada").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_floor_that_is_no_position_is_unavailable_not_zero() {
    use fred::prelude::KeysInterface as _;
    let (floors, client, prefix) = floors().await;
    let _: () = client
        .set(
            format!("{prefix}floor:{{ada}}"),
            "not a position",
            None,
            None,
            false,
        )
        .await
        .unwrap();
    assert!(floors.get("ada").await.is_err());
}

#[tokio::test]
async fn in_process_floors_keep_the_highest_too() {
    let floors = Floors::local();
    let minute = Duration::from_secs(60);
    floors.raise("ada", Lsn(9), minute).await.unwrap();
    floors.raise("ada", Lsn(3), minute).await.unwrap();
    assert_eq!(floors.get("ada").await.unwrap(), Some(Lsn(9)));
}
